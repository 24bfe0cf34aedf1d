"""The streaming side of the pipeline model in-process (a stand-in for
`triton_python_backend_utils`): a progress response per round, and each instance's own
admission control, which Triton's queue policy cannot give a decoupled python model (its async
`execute` runs in the background and Triton hands it the next request at once). Served over a
real gRPC stream: tests/test_wan_serving.py."""
from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

TEMPLATE = (Path(__file__).resolve().parents[1] / "triton_models" / "templates" / "driffusion"
            / "1" / "model.py")
FINAL = "final"


class FakeError:
    UNAVAILABLE, INVALID_ARG = "UNAVAILABLE", "INVALID_ARG"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {tensor.name: int(tensor.value[0]) for tensor in output_tensors}
        self.error = error


class FakeSender:
    def __init__(self):
        self.sent: list[tuple[FakeResponse, str | None]] = []

    def send(self, response, flags=None):
        self.sent.append((response, flags))


class FakeRequest:
    def __init__(self, name):
        self.name = name
        self.sender = FakeSender()

    def get_response_sender(self):
        return self.sender


FAKE_PB_UTILS = SimpleNamespace(
    TritonError=FakeError, InferenceResponse=FakeResponse,
    Tensor=lambda name, value: SimpleNamespace(name=name, value=value),
    TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL,
)


@pytest.fixture
def module(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FAKE_PB_UTILS)
    spec = importlib.util.spec_from_file_location("driffusion_model_under_test", TEMPLATE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_progress_responses_count_rounds_and_steps(module):
    sender = FakeSender()
    progress = module.ProgressSender(sender, total_steps=8)
    for refined in (1, 4, 3):
        progress(refined)
    assert [(response.outputs, flags) for response, flags in sender.sent] == [
        ({"STEPS_DONE": done, "STEPS_TOTAL": 8, "ROUNDS": rounds}, None)
        for rounds, done in ((1, 1), (2, 5), (3, 8))]


def test_the_instance_runs_its_concurrency_and_refuses_beyond_its_queue(module):
    """concurrency 2, max_queue_size 1: two requests run, one waits, the fourth is refused
    UNAVAILABLE at once; each request's last response carries the final flag."""
    model = module.TritonPythonModel()
    model.stream, model.concurrency, model.max_waiting = True, 2, 1
    model._turns, model._admitted = None, 0
    counted = []
    model.metrics = SimpleNamespace(add=lambda family, value, **labels: counted.append(labels))
    running, release = [], asyncio.Event()

    async def respond(request, sender):
        running.append(request.name)
        await release.wait()
        return FakeResponse([FAKE_PB_UTILS.Tensor("ROUNDS", [len(running)])])

    model._respond = respond
    requests = [FakeRequest(name) for name in "abcd"]

    async def run():
        streams = [asyncio.ensure_future(model._stream(request)) for request in requests]
        await asyncio.sleep(0.05)
        assert running == ["a", "b"]  # c waits for its turn; d was refused
        assert [len(request.sender.sent) for request in requests] == [0, 0, 0, 1]
        release.set()
        await asyncio.gather(*streams)

    asyncio.run(run())
    assert running == ["a", "b", "c"]
    (refused, flags), = requests[3].sender.sent
    assert flags == FINAL and refused.error.code == FakeError.UNAVAILABLE
    assert "server busy" in refused.error.message and "--max-queue-size" in refused.error.message
    assert counted == [{"mode": "unknown", "outcome": "unavailable"}]
    for request in requests[:3]:
        (answer, flags), = request.sender.sent
        assert flags == FINAL and answer.error is None
    assert model._admitted == 0
