"""Load: concurrent clients against the `driffusion` model on dynamically batched unet_sim
devices (a short `driffusion bench load`), and the device configs that make batching happen."""
from __future__ import annotations

import json

import pytest
from test_triton_repository import load_config, parameters

from bench.load import summarise
from cli import main as cli_main
from triton_models.repository import RepositoryOptions, write_repository


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory):
    repository = write_repository(tmp_path_factory.mktemp("load") / "repo", RepositoryOptions(
        model="sim", devices=2, sim_latency_ms=20, pipeline_instances=2))
    return triton_server(repository.path)


@pytest.mark.triton
@pytest.mark.slow  # 17 s; the load bench's counting is tested below without a server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_short_load_has_no_failures_and_device_calls_share_batches(server, tmp_path, capsys,
                                                                   protocol):
    out = tmp_path / "load.json"
    endpoint = server.http_url if protocol == "http" else server.grpc_url
    code = cli_main(["bench", "load", "--endpoint", endpoint, "--clients", "8",
                     "--duration", "5", "--steps", "8", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    (result,) = json.loads(out.read_text())["results"]
    assert result["failures"] == 0 and result["requests"] >= 8, result
    assert result["protocol"] == protocol
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    # 2 pipeline instances x 2 drafts per round meet 2 device instances: Triton merges calls
    assert result["calls_per_execution"] > 1.0, result
    assert "0 failures" in printed and "req/s" in printed


@pytest.mark.triton
@pytest.mark.slow
def test_compare_guard_runs_the_same_load_through_the_guard_and_tritons_own_port(tmp_path,
                                                                               capsys):
    out = tmp_path / "load.json"
    code = cli_main(["bench", "load", "--compare-guard", "--protocol", "http", "--clients", "4",
                     "--duration", "3", "--steps", "8", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    guard, own = json.loads(out.read_text())["results"]
    assert (guard["port"], own["port"]) == ("guard", "triton")
    assert guard["requests"] >= 4 and own["requests"] >= 4
    assert "through the guard:" in printed and "the throughput of Triton's own port" in printed


def test_summary_counts_failures_by_message_and_takes_percentiles():
    samples = [(0.1 * k, None) for k in range(1, 101)] + [(5.0, "deadline exceeded")] * 2
    result = summarise(samples, seconds=10.0, batching="dynamic", before=(10, 5),
                       after=(110, 30))
    assert result.requests == 102 and result.failures == 2
    assert result.errors == {"deadline exceeded": 2}
    assert result.throughput_rps == 10.0  # successes only
    assert result.latency_ms["p50"] == pytest.approx(5050.0)
    assert result.latency_ms["max"] == 10000.0
    assert result.calls_per_execution == 4.0


@pytest.mark.parametrize("model", ["sim", "engines"])
def test_device_models_batch_dynamically_unless_turned_off(model, tmp_path):
    from test_triton_repository import write_engines

    source = "sim" if model == "sim" else str(write_engines(tmp_path / "engines", "onnxruntime"))
    name = "unet_sim" if model == "sim" else "unet_cpu0"
    batched = load_config(write_repository(tmp_path / "on", RepositoryOptions(
        model=source, devices=1, max_batch=16, batch_delay_us=500)).path / name)
    assert batched.max_batch_size == 16
    assert batched.dynamic_batching.max_queue_delay_microseconds == 500
    assert parameters(batched)["batching"] == "true"
    single = load_config(write_repository(tmp_path / "off", RepositoryOptions(
        model=source, devices=1, max_batch=16, dynamic_batching=False)).path / name)
    assert single.max_batch_size == 0 and not single.HasField("dynamic_batching")
    assert parameters(single)["max_batch"] == "16"  # the device layer splits larger calls
