"""Helpers shared by the python-backend models (light: no torch, importable without the stub).

The model sources in `templates/` run inside `triton_python_backend_stub`; what does not need
`triton_python_backend_utils` lives in importable modules so that it is tested in-process.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The `parameters` of a model's config.pbtxt as plain strings (from initialize's args)."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def version_dir(args: Mapping[str, str]) -> Path:
    """The model version directory (where the repository generator put the model's files)."""
    return Path(args["model_repository"]) / str(args["model_version"])


def file_in_version_dir(args: Mapping[str, str], name: str) -> Path:
    """A file named by a config parameter; it must be a plain name inside the version dir."""
    directory = version_dir(args).resolve()
    path = (directory / name).resolve()
    if Path(name).name != name or path.parent != directory:
        raise ValueError(f"parameter file {name!r} is not a plain file name in {directory}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} named in the model config does not exist")
    return path


Batch = dict[str, np.ndarray]


def run_batched(requests: Sequence[Batch], run: Callable[[Batch], Batch]) -> list[Batch | Exception]:
    """Run a dynamically batched set of requests as few calls as possible.

    Requests whose inputs have the same per-item shapes and dtypes are concatenated along the
    batch axis into one `run` call, whose outputs are split back per request. A call that raises
    answers each of its requests with the exception.
    """
    groups: dict[tuple, list[int]] = {}
    for index, inputs in enumerate(requests):
        key = tuple((name, value.shape[1:], value.dtype.str) for name, value in sorted(inputs.items()))
        groups.setdefault(key, []).append(index)
    answers: list[Batch | Exception] = [ValueError("not run")] * len(requests)
    for members in groups.values():
        merged = {name: np.concatenate([requests[i][name] for i in members])
                  for name in requests[members[0]]}
        try:
            outputs = run(merged)
        except Exception as error:  # noqa: BLE001 - reported to each request of the call
            for i in members:
                answers[i] = error
            continue
        sizes = [len(next(iter(requests[i].values()))) for i in members]
        parts = {name: np.split(value, np.cumsum(sizes)[:-1]) for name, value in outputs.items()}
        for position, i in enumerate(members):
            answers[i] = {name: split[position] for name, split in parts.items()}
    return answers


# how often a running request asks Triton whether its client gave up: each question is an IPC
# round trip from the stub to the server (about 0.4 ms of a 20 ms round on 2 cores, measured by
# `driffusion bench floor`), so it is asked at most this often instead of before every round
CANCEL_CHECK_INTERVAL_S = 0.05


class ThrottledCheck:
    """`check()` asked at most once per `interval_s`; in between, the last answer (False until
    it first answers True, and True from then on)."""

    def __init__(self, check: Callable[[], bool], interval_s: float = CANCEL_CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.check = check
        self.interval_s = interval_s
        self.clock = clock
        self.answer = False
        self.asked = 0  # questions put to `check`
        self._next = clock()

    def __call__(self) -> bool:
        if not self.answer and self.clock() >= self._next:
            self.asked += 1
            self.answer = bool(self.check())
            self._next = self.clock() + self.interval_s
        return self.answer


class FaultInjection:
    """Reliability tests' fault injection: the listed calls (1-based) of a model instance raise,
    as a crashing device would. Empty by default (parameter `fail_calls`, e.g. "3,7")."""

    def __init__(self, parameters: Mapping[str, str]) -> None:
        self.failing = {int(n) for n in parameters.get("fail_calls", "").split(",") if n}
        self.calls = 0

    def check(self, model: str) -> None:
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError(f"{model}: injected fault on call {self.calls}")


def answer_requests(requests: Sequence, feeds_of: Callable[[object], Batch | str],
                    run: Callable[[Batch], Batch], batching: bool) -> list:
    """Each request's answer: the outputs of `run` on its inputs, the exception `run` raised, or
    the message `feeds_of` gave for inputs that do not fit. With `batching`, the fitting
    requests Triton handed over together share calls (`run_batched`)."""
    answers: list = [None] * len(requests)
    runnable = []
    for index, request in enumerate(requests):
        feeds = feeds_of(request)
        if isinstance(feeds, str):
            answers[index] = feeds
        else:
            runnable.append((index, feeds))
    inputs = [feeds for _, feeds in runnable]
    results = run_batched(inputs, run) if batching else [_call(run, feeds) for feeds in inputs]
    for (index, _), result in zip(runnable, results):
        answers[index] = result
    return answers


def _call(run: Callable[[Batch], Batch], feeds: Batch) -> Batch | Exception:
    try:
        return run(feeds)
    except Exception as error:  # noqa: BLE001 - answered to the request, classified by the model
        return error
