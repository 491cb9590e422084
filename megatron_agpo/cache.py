"""Folders built once and cached (the warm-started tiny model, the converted SmolLM2)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_once(
    out: Path, complete: Callable[[Path], bool], build: Callable[[Path], object]
) -> Path:
    """`out`, built by `build(folder)` unless `complete(out)` already holds.

    Processes started together on an empty cache (parallel test workers, ranks, two jobs on
    one machine) build it once: the first to take the folder's lock builds into a temporary
    folder of its own and renames it into place (atomic: a killed build leaves only that
    folder); the others wait and find it complete. A partial `out` an older version left is
    replaced."""
    if complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete(out):
            return out
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        try:
            build(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
