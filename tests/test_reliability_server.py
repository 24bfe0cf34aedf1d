"""Reliability, round 2, against real tritonservers: cancellation frees the devices, a device
that crashes fails over with the same image, concurrent requests never mix, metrics count, and
bad text requests are INVALID_ARGUMENT while the server stays ready."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc_client
from servers import metric
from tritonclient.utils import InferenceServerException

from triton_models.pipeline_io import DRIFFUSION_INPUTS
from triton_models.repository import RepositoryOptions
from triton_models.serve import write_repository

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]

WIRE = {"TYPE_STRING": ("BYTES", np.object_), "TYPE_INT32": ("INT32", np.int32),
        "TYPE_INT64": ("INT64", np.int64), "TYPE_FP32": ("FP32", np.float32)}
PROMPTS = ["a photo of a cat", "a red car", "", "two dogs on a beach"]


def tensor(name: str, value, wire: str | None = None, shape=None):
    """An input tensor of the driffusion model (its declared type unless `wire` says else)."""
    datatype, dtype = WIRE[DRIFFUSION_INPUTS[name][0]] if wire is None else wire
    array = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
    if shape is not None:
        array = np.resize(array, shape)
    item = grpc_client.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def infer(url: str, timeout_s: float | None = None, **fields) -> dict[str, np.ndarray]:
    client = grpc_client.InferenceServerClient(url)
    try:
        inputs = [tensor(name, value) for name, value in fields.items()]
        result = client.infer("driffusion", inputs, client_timeout=timeout_s)
        return {name: result.as_numpy(name) for name in ("IMAGE", "ROUNDS", "EVALUATIONS")}
    finally:
        client.close()


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_engines):
    """tiny-sd's ONNX Runtime engines, built once for the run (conftest)."""
    return tiny_sd_engines


@pytest.fixture(scope="module")
def text_server(triton_server, tiny_sd, tmp_path_factory):
    options = RepositoryOptions(**{**vars(tiny_sd), "devices": 2, "pipeline_instances": 4,
                                   "max_prompt_bytes": 1024})
    return triton_server(write_repository(tmp_path_factory.mktemp("a") / "repo", options).path)


@pytest.fixture(scope="module")
def crashing_server(triton_server, tiny_sd, tmp_path_factory):
    """The same model, but its device unet_cpu0 raises on its 3rd and 4th calls."""
    options = RepositoryOptions(**{**vars(tiny_sd), "devices": 2, "fail_calls": (3, 4)})
    return triton_server(write_repository(tmp_path_factory.mktemp("b") / "repo", options).path)


REQUEST = {"PROMPT": "a photo of a cat", "NEGATIVE_PROMPT": "blurry", "SEED": 5, "STEPS": 8,
           "MODE": "aggressive", "WINDOW": 2, "GUIDANCE": 4.0}


@pytest.mark.slow  # one more server; failover inside driffusion: tests/test_reliability.py
def test_a_device_that_raises_fails_over_and_the_image_is_unchanged(text_server,
                                                                     crashing_server):
    expected = infer(text_server.grpc_url, **REQUEST)
    before = metric(crashing_server, "driffusion_device_failovers_total")
    served = infer(crashing_server.grpc_url, **REQUEST)
    np.testing.assert_array_equal(served["IMAGE"], expected["IMAGE"])
    assert metric(crashing_server, "driffusion_device_failovers_total") > before
    assert served["ROUNDS"][0] < REQUEST["STEPS"] and served["EVALUATIONS"][0] == REQUEST["STEPS"]


def test_concurrent_requests_with_different_prompts_equal_their_solo_runs(text_server):
    requests = [{**REQUEST, "PROMPT": prompt, "SEED": seed, "MODE": mode}
                for seed, (prompt, mode) in enumerate(
                    (p, m) for p in PROMPTS for m in ("aggressive", "sequential"))]
    solo = [infer(text_server.grpc_url, **request)["IMAGE"] for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: infer(text_server.grpc_url, **r)["IMAGE"], requests))
    for alone, concurrent in zip(solo, together):
        np.testing.assert_array_equal(alone, concurrent)
    assert len({image.tobytes() for image in solo}) == len(solo)


def test_metrics_count_requests_rounds_and_evaluations(text_server):
    before = {name: metric(text_server, name, mode="aggressive") for name in
              ("driffusion_requests_total", "driffusion_rounds_total",
               "driffusion_evaluations_total", "driffusion_steps_total")}
    served = infer(text_server.grpc_url, **REQUEST)
    after = {name: metric(text_server, name, mode="aggressive") for name in before}
    assert after["driffusion_requests_total"] - before["driffusion_requests_total"] == 1
    assert after["driffusion_rounds_total"] - before["driffusion_rounds_total"] == \
        served["ROUNDS"][0]
    assert after["driffusion_evaluations_total"] - before["driffusion_evaluations_total"] == \
        served["EVALUATIONS"][0]
    assert after["driffusion_steps_total"] - before["driffusion_steps_total"] == REQUEST["STEPS"]


BAD_TEXT = {
    "invalid UTF-8": ([tensor("PROMPT", b"\xff\xfe cat")], "PROMPT", "UTF-8"),
    "NUL bytes": ([tensor("PROMPT", "a cat\x00")], "PROMPT", "NUL"),
    "1 MB prompt": ([tensor("PROMPT", "x" * 1_000_000)], "PROMPT", "at most 1024 bytes"),
    "prompt as INT32": ([tensor("PROMPT", 3, WIRE["TYPE_INT32"])], "PROMPT", "BYTES"),
    "prompt of shape [2]": ([tensor("PROMPT", "a cat", shape=[2])], "PROMPT", "shape"),
    "negative without prompt": ([tensor("NEGATIVE_PROMPT", "blurry")], "PROMPT",
                                "needs a PROMPT"),
    "guidance NaN": ([tensor("PROMPT", "a"), tensor("GUIDANCE", float("nan"))], "GUIDANCE",
                     "0..50"),
    "guidance infinite": ([tensor("PROMPT", "a"), tensor("GUIDANCE", float("inf"))],
                          "GUIDANCE", "0..50"),
    "seed below 0": ([tensor("PROMPT", "a"), tensor("SEED", -1)], "SEED", "0..2^63-1"),
    "height off the profile": ([tensor("PROMPT", "a"), tensor("HEIGHT", 72)], "HEIGHT", "64"),
    "width off the profile": ([tensor("PROMPT", "a"), tensor("WIDTH", 128)], "WIDTH", "64"),
    "label for a text model": ([tensor("LABEL", 3)], "LABEL", "PROMPT"),
    "unknown scheduler": ([tensor("PROMPT", "a"), tensor("SCHEDULER", "heun")], "SCHEDULER",
                          "one of default"),
    "flow scheduler": ([tensor("PROMPT", "a"), tensor("SCHEDULER", "flow_euler")], "SCHEDULER",
                       "does not fit"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_bad_text_requests_are_invalid_argument_naming_the_field(text_server, case):
    inputs, field, says = BAD_TEXT[case]
    client = grpc_client.InferenceServerClient(text_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("driffusion", inputs)
        assert client.is_server_ready()
    finally:
        client.close()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value.message()
    assert field in caught.value.message() and says in caught.value.message()
    assert len(caught.value.message()) < 600  # client values are cut, no traceback


def test_an_empty_prompt_is_allowed_and_long_prompts_are_truncated(text_server):
    empty = infer(text_server.grpc_url, PROMPT="", STEPS=4)
    assert empty["IMAGE"].shape == (64, 64, 3)
    words = " ".join(["cat"] * 100)  # 100 tokens: the last 25 are dropped, as CLIP drops them
    longer = infer(text_server.grpc_url, PROMPT=words + " dog", STEPS=4, SEED=1)
    same = infer(text_server.grpc_url, PROMPT=words + " bird", STEPS=4, SEED=1)
    np.testing.assert_array_equal(longer["IMAGE"], same["IMAGE"])


@pytest.fixture(scope="module")
def slow_server(triton_server, tmp_path_factory):
    """The closed-form sim at 20 ms per device call: a 1,000-step request runs for seconds."""
    options = RepositoryOptions(model="sim", devices=2, sim_latency_ms=20.0)
    return triton_server(write_repository(tmp_path_factory.mktemp("c") / "repo", options).path)


def test_the_cancellation_check_asks_triton_at_most_once_per_interval_and_remembers_yes():
    from triton_models.backend import ThrottledCheck

    now, answers = [0.0], iter([False, False, True])
    asked = []

    def is_cancelled() -> bool:
        asked.append(now[0])
        return next(answers)

    check = ThrottledCheck(is_cancelled, interval_s=0.05, clock=lambda: now[0])
    for step in range(20):  # 20 rounds of 10 ms: asked at 0, 50 and 100 ms
        now[0] = step * 0.01
        check()
    assert asked == pytest.approx([0.0, 0.05, 0.1])
    assert check() and check.asked == 3  # once cancelled, never asked again


def test_a_request_whose_client_gave_up_stops_within_a_round_and_the_check_interval(slow_server):
    def cancelled() -> float:
        return metric(slow_server, "driffusion_requests_total", outcome="cancelled")

    def rounds() -> float:
        return metric(slow_server, "driffusion_rounds_total", mode="sequential")

    before = cancelled()
    with pytest.raises(InferenceServerException, match="Deadline"):
        infer(slow_server.grpc_url, timeout_s=1.0, LABEL=3, STEPS=1000, MODE="sequential")
    gave_up = time.monotonic()
    while cancelled() == before and time.monotonic() - gave_up < 5.0:
        time.sleep(0.02)
    stopped_after_s = time.monotonic() - gave_up
    assert cancelled() == before + 1
    ran = rounds()  # the cancelled request's rounds: ~1 s of 20 ms rounds, not 1,000
    assert 10 < ran < 100, ran
    time.sleep(0.5)
    assert rounds() == ran  # quiet: nothing more ran for the abandoned request
    print(f"\ncancelled request stopped {stopped_after_s * 1000:.0f} ms after the client's "
          f"deadline, after {ran:.0f} of 1000 rounds")
    served = infer(slow_server.grpc_url, LABEL=3, STEPS=6, MODE="sequential")
    assert served["IMAGE"].shape == (8, 8, 3)


@pytest.mark.slow  # serve's own signal handling: tests/test_triton_serving.py (SIGTERM)
def test_make_serve_stops_its_server_and_every_stub_when_make_is_terminated(free_ports):
    from triton_models.serve import group_members

    grpc_port, http_port, metrics_port = free_ports(3)
    ports = f"--grpc-port {grpc_port} --http-port {http_port} --metrics-port {metrics_port}"
    make = subprocess.Popen(["make", "serve", "MODEL=sim", f"TRITON_ARGS={ports}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = ""
        deadline = time.monotonic() + 240
        while "Triton ready" not in seen and time.monotonic() < deadline:
            line = make.stdout.readline()
            if not line and make.poll() is not None:
                break
            seen += line
        assert "Triton ready" in seen, seen[-2000:]
        group = make.pid  # make leads its own session; the server runs in a group of its own
        servers = [pid for pid in _descendants(make.pid) if _name(pid) == "tritonserver"]
        assert servers
        make.send_signal(signal.SIGTERM)  # what `timeout make serve` sends: to make alone
        make.wait(60)
        stop = time.monotonic() + 30
        while any(group_members(pid) for pid in servers) and time.monotonic() < stop:
            time.sleep(0.2)
        assert [group_members(pid) for pid in servers] == [[]] * len(servers)
        assert group_members(group) == []
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                              check=False).stdout.split()
    return [int(c) for c in children] + [d for c in children for d in _descendants(int(c))]


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def small_queue_server(triton_server, tmp_path_factory):
    """One driffusion instance with a queue of 2: a burst of 6 long requests overloads it."""
    options = RepositoryOptions(model="sim", devices=2, sim_latency_ms=20.0, pipeline_instances=1,
                                max_queue_size=2)
    return triton_server(write_repository(tmp_path_factory.mktemp("q") / "repo", options).path)


def test_an_overload_burst_is_refused_at_once_and_the_server_recovers(small_queue_server):
    def one(_) -> tuple[str, float]:
        started = time.monotonic()
        try:
            infer(small_queue_server.grpc_url, LABEL=3, STEPS=30, MODE="sequential")
            return "ok", time.monotonic() - started
        except InferenceServerException as error:
            return f"{error.status()}: {error.message()}", time.monotonic() - started

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, range(6)))
    refused = [(said, seconds) for said, seconds in outcomes if said != "ok"]
    assert len(refused) >= 2, outcomes  # 1 running + 2 queued at most
    for said, seconds in refused:
        assert said.startswith("StatusCode.UNAVAILABLE") and "queue" in said
        assert seconds < 0.5  # refused at once, not after waiting
    assert infer(small_queue_server.grpc_url, LABEL=3, STEPS=4)["IMAGE"].shape == (8, 8, 3)


def test_the_generate_client_stops_issuing_device_calls_at_its_deadline(slow_server, tmp_path):
    from cli import main as driffusion

    def device_calls() -> float:  # direct gRPC calls of the client's pool are counted
        return metric(slow_server, "nv_inference_request_success", model="unet_sim")

    started = time.monotonic()
    code = driffusion(["generate", "--endpoints", slow_server.grpc_url, "--label", "3",
                       "--steps", "1000", "--mode", "sequential", "--timeout-s", "1",
                       "--quiet", "--out", str(tmp_path / "x.png")])
    assert code == 3 and time.monotonic() - started < 5.0
    time.sleep(0.3)
    quiet_from = device_calls()
    assert 0 < quiet_from < 200  # ~1 s of 20 ms rounds were issued, not 1,000
    time.sleep(0.5)
    assert device_calls() == quiet_from
