"""The cluster deployment (deploy/, docs/DEPLOY.md), checked without Docker, Kubernetes or GPUs.

The manifests are parsed and held to what the servers need (a GPU per device server, probes on
Triton's health endpoints, the front naming every device Service, the engines volume and key);
with `kubernetes-validate` installed they are also validated against Kubernetes' own schemas.
The role script every container runs is executed for real with the closed-form sim: its
`triton-repo` call writes the repository and its tritonserver command line starts the embedded
tritonserver (the same Triton release as the image) as a device server and a front.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from triton_models.serve import EmbeddedServer, backend_dir, free_ports, pytriton_dir

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCRIPT = DEPLOY / "driffusion-role.sh"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
KUBERNETES_VERSION = "1.30.0"


def k8s_documents() -> list[tuple[str, dict]]:
    return [(path.name, document) for path in sorted(K8S.glob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text()) if document]


def of_kind(kind: str) -> list[dict]:
    return [document for _, document in k8s_documents() if document["kind"] == kind]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(container_spec: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container_spec.get("env", [])}


def config() -> dict[str, str]:
    (found,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "driffusion-config"]
    return found["data"]


def role(deployment: dict) -> str:
    return env(container(deployment))["ROLE"]


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests


def test_every_manifest_is_a_named_object_of_the_driffusion_namespace():
    documents = k8s_documents()
    assert {name for name, _ in documents} == {path.name for path in K8S.glob("*.yaml")}
    for name, document in documents:
        assert {"apiVersion", "kind"} <= set(document), name
        if document["kind"] == "Kustomization":
            continue
        assert document["metadata"]["name"].startswith("driffusion"), name
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "driffusion", name
    (kustomization,) = of_kind("Kustomization")
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in K8S.glob("*.yaml")} - {
        "kustomization.yaml", "build-engines-job.yaml"}  # the build job runs first, on its own


def test_manifests_validate_against_the_kubernetes_schemas():
    validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for name, document in k8s_documents():
        if document["kind"] != "Kustomization":
            validate.validate(document, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(of_kind("Deployment")[0]))
    container(broken)["readinessProbe"]["httpGett"] = container(broken)["readinessProbe"].pop(
        "httpGet")
    with pytest.raises(validate.ValidationError):
        validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_device_servers_are_one_deployment_per_gpu_and_the_fronts_name_each_of_them():
    deployments = of_kind("Deployment")
    devices = [d for d in deployments if role(d) == "device"]
    fronts = [d for d in deployments if role(d) == "front"]
    assert len(devices) >= 2 and len(fronts) == 1
    for device in devices:
        assert device["spec"]["replicas"] == 1
        assert container(device)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env(container(device))["DEVICES"] == "1"
    (front,) = fronts
    assert env(container(front))["DEVICES"] == "0"
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    endpoints = config()["DEVICE_ENDPOINTS"].split(",")
    # every device server behind a Service of its own, and the fronts call each of them
    device_services = []
    for device in devices:
        labels = device["spec"]["template"]["metadata"]["labels"]
        (service,) = [s for s in services.values()
                      if s["spec"]["selector"].items() <= labels.items()]
        device_services.append(f"{service['metadata']['name']}:8001")
    assert sorted(endpoints) == sorted(device_services)
    front_labels = front["spec"]["template"]["metadata"]["labels"]
    assert services["driffusion-front"]["spec"]["selector"].items() <= front_labels.items()


def test_every_server_has_triton_ports_probes_and_binds_its_pod_address():
    for deployment in of_kind("Deployment"):
        spec = container(deployment)
        ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
        assert ports == PORTS
        assert spec["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert spec["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert spec["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert env(spec)["HOST"] == "$(POD_IP)"  # never 0.0.0.0 in a pod
        pod_ip = next(item for item in spec["env"] if item["name"] == "POD_IP")
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert spec["securityContext"]["allowPrivilegeEscalation"] is False
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    for service in of_kind("Service"):
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(PORTS)


def test_engines_are_built_once_per_gpu_type_and_shared_read_only():
    data = config()
    (job,) = of_kind("Job")
    build = job["spec"]["template"]["spec"]
    args = build["containers"][0]["args"]
    out = args[args.index("--out") + 1]
    name = args[args.index("--name") + 1]
    mount = build["containers"][0]["volumeMounts"][0]["mountPath"]
    # servers serve engines/<model>/<gpu-key>/ as the job writes it, on the same volume
    assert data["MODEL"] == f"{out}/{name}" and data["MODEL"].startswith(mount)
    assert re.fullmatch(r"[a-z0-9]+-sm\d+-[0-9a-f]{8}", data["GPU_KEY"])
    assert build["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    claim = build["volumes"][0]["persistentVolumeClaim"]["claimName"]
    for deployment in of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
        (mounted,) = [m for m in container(deployment)["volumeMounts"]
                      if m["name"] == volume["name"]]
        assert mounted["readOnly"] is True and data["MODEL"].startswith(mounted["mountPath"])
        # the GPU type the engine set was built for
        assert pod["nodeSelector"] == build["nodeSelector"]
    (claim_object,) = of_kind("PersistentVolumeClaim")
    assert claim_object["spec"]["accessModes"] == ["ReadWriteMany"]


def test_device_grpc_is_open_to_the_fronts_only():
    (policy,) = of_kind("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "device"
    grpc_rules = [rule for rule in policy["spec"]["ingress"]
                  if any(port["port"] == 8001 for port in rule["ports"])]
    (rule,) = grpc_rules
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "front"


# ---------------------------------------------------------------------------------------------
# docker compose, Dockerfile, docs


def test_compose_runs_one_device_server_per_gpu_and_a_front_over_them():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    devices = {name: s for name, s in services.items()
               if s.get("environment", {}).get("ROLE") == "device"}
    (front,) = [s for s in services.values() if s.get("environment", {}).get("ROLE") == "front"]
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for s in devices.values()]
    assert len(devices) >= 2 and all(len(ids) == 1 for ids in gpus)
    assert len({ids[0] for ids in gpus}) == len(gpus)  # one GPU each, all different
    assert sorted(front["environment"]["DEVICE_ENDPOINTS"].split(",")) == \
        sorted(f"{name}:8001" for name in devices)
    assert front["environment"]["DEVICES"] == "0"
    assert front["depends_on"] == {name: {"condition": "service_healthy"} for name in devices}
    assert all("/v2/health/ready" in " ".join(s["healthcheck"]["test"])
               for s in [front, *devices.values()])
    assert all("ports" not in s for s in devices.values())  # only the front is published
    assert all(port.startswith("127.0.0.1:") for port in front["ports"])
    assert all(s["volumes"] == ["../engines:/engines:ro"] for s in [front, *devices.values()])


def test_the_image_holds_every_package_and_the_role_script():
    text = (DEPLOY / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r'include = \[([^\]]*)\]', pyproject).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert re.search(rf"^COPY {package}\b", text, re.MULTILINE), package
    assert "COPY deploy/driffusion-role.sh" in text and "tritonclient[grpc]" in text
    assert 'ENTRYPOINT ["/opt/driffusion/driffusion-role.sh"]' in text


def test_the_deploy_doc_covers_the_files_and_what_was_never_run():
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    for path in [*K8S.glob("*.yaml"), DEPLOY / "docker-compose.yml", DEPLOY / "Dockerfile",
                 SCRIPT]:
        assert str(path.relative_to(ROOT)) in text, path
    assert "never run" in text.lower() and "engines/<model>/<gpu-key>/" in text


# ---------------------------------------------------------------------------------------------
# The role script, for real with the sim


def role_script(tmp_path: Path, role: str, **settings) -> list[str]:
    """Run the role script with DRY_RUN=nul: it writes the repository and returns the
    tritonserver command line it would exec."""
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   "ROLE": role, "MODEL": "sim", "BACKEND": "onnxruntime", "DRY_RUN": "nul",
                   "REPOSITORY": str(tmp_path / role), **settings}
    done = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode().split("\0")[:-1]


class ScriptServer(EmbeddedServer):
    """The embedded tritonserver, started with the role script's own command line."""

    def __init__(self, argv: list[str], ports: dict[str, int], log_path: Path) -> None:
        repository = next(a for a in argv if a.startswith("--model-repository="))
        super().__init__(repository.split("=", 1)[1], grpc_port=ports["grpc"],
                         http_port=ports["http"], metrics_port=ports["metrics"],
                         log_path=log_path)
        self.argv = argv

    def command(self) -> list[str]:
        binary = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        return [str(binary), *self.argv[1:], f"--backend-directory={backend_dir()}"]


def test_role_script_refuses_an_unknown_role_and_a_front_without_endpoints(tmp_path):
    base = {**os.environ, "MODEL": "sim", "DRY_RUN": "1"}
    unknown = subprocess.run(["bash", str(SCRIPT)], env={**base, "ROLE": "gpu"},
                             capture_output=True, text=True, check=False)
    assert unknown.returncode == 2 and "ROLE must be device, encoder or front" in unknown.stderr
    front = subprocess.run(["bash", str(SCRIPT)], env={**base, "ROLE": "front"},
                           capture_output=True, text=True, check=False)
    assert front.returncode != 0 and "DEVICE_ENDPOINTS" in front.stderr


def test_role_script_writes_an_encoder_server_and_a_front_that_calls_it(tmp_path):
    encoder_argv = role_script(tmp_path, "encoder")
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir() if p.is_dir()) == \
        ["text_encoder"]  # the sim's label encoder, nothing else
    assert any(a.startswith("--model-repository=") for a in encoder_argv)
    role_script(tmp_path, "front", DEVICE_ENDPOINTS="10.0.0.2:8001",
                ENCODER_ENDPOINTS="10.0.0.9:8001")
    assert not (tmp_path / "front" / "text_encoder").exists()
    config = (tmp_path / "front" / "driffusion" / "config.pbtxt").read_text()
    assert 'key: "encoder_endpoints" value { string_value: "10.0.0.9:8001" }' in config


@pytest.mark.triton
@pytest.mark.slow  # 30 s; fronts over device servers: tests/test_scale_out.py
def test_role_script_starts_a_device_server_and_a_front_that_serves_images(tmp_path):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    device_ports = dict(zip(PORTS, free_ports(3)))
    front_ports = dict(zip(PORTS, free_ports(3)))

    def ports(chosen):
        return {f"{kind.upper()}_PORT": str(port) for kind, port in chosen.items()}

    device_argv = role_script(tmp_path, "device", HOST="127.0.0.1", **ports(device_ports))
    assert "--grpc-address=127.0.0.1" in device_argv
    assert any(a.startswith("--grpc-restricted-protocol=shared-memory,trace,logging:")
               for a in device_argv)
    assert not (tmp_path / "device" / "driffusion").exists()
    endpoint = f"127.0.0.1:{device_ports['grpc']}"
    front_argv = role_script(tmp_path, "front", HOST="127.0.0.1", DEVICE_ENDPOINTS=endpoint,
                             DEADLINE_S="5", EXTRA_ARGS="--pipeline-instances 1",
                             **ports(front_ports))
    assert not (tmp_path / "front" / "unet_sim").exists()
    with ScriptServer(device_argv, device_ports, tmp_path / "device.log") as device:
        wait = subprocess.run([sys.executable, "-m", "triton_models.device_endpoints", "wait",
                               endpoint, "--timeout-s", "30"], capture_output=True, text=True,
                              timeout=60, check=False)
        assert wait.returncode == 0, wait.stderr
        with ScriptServer(front_argv, front_ports, tmp_path / "front.log") as front:
            for path in ("/v2/health/live", "/v2/health/ready"):
                with urllib.request.urlopen(front.http_url + path, timeout=5) as reply:
                    assert reply.status == 200
            image = infer_label(front.grpc_url)
            assert image.shape == (8, 8, 3) and image.dtype == np.uint8
            assert f"remote devices {endpoint}/unet_sim x1" in front.log_path.read_text()
        assert device.is_ready()


def infer_label(url: str) -> np.ndarray:
    import tritonclient.grpc as grpc_client

    tensor = grpc_client.InferInput("LABEL", [1], "INT32")
    tensor.set_data_from_numpy(np.array([3], np.int32))
    client = grpc_client.InferenceServerClient(url)
    try:
        return client.infer("driffusion", [tensor], client_timeout=60).as_numpy("IMAGE")
    finally:
        client.close()


def test_waiting_for_a_device_server_that_never_comes_names_it():
    (port,) = free_ports(1)
    done = subprocess.run([sys.executable, "-m", "triton_models.device_endpoints", "wait",
                           f"127.0.0.1:{port}", "--timeout-s", "1", "--poll-s", "0.5"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert f"device servers not ready after 1 s: 127.0.0.1:{port}" in done.stderr
