"""One build of a model's exports and engines at a time: a lock file in its engines directory.

Two `build-engines`, `serve` or `triton-repo` runs for the same model (replicas starting together
on a shared volume, two shells) would otherwise export and write the same files at once. The
second waits for the first and then finds its engines current (the manifest keeps them).
"""
from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".build.lock"


@contextmanager
def exclusive_build(model_dir: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the build lock of the model whose engines live in `model_dir`, saying so when another
    build holds it; released when the block ends, or by the OS when the process dies."""
    model_dir.mkdir(parents=True, exist_ok=True)
    lock_path = model_dir / LOCK_FILE
    with open(lock_path, "a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build of the same model to finish ({lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
