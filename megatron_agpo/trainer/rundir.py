"""One owner per run folder, and no silent loss of an earlier run's history.

- `claim`: rank 0 takes an exclusive `flock` on `run_dir/.agpo-run.lock` and writes its host,
  pid and start time into it. A second run on the same folder exits 2 naming the holder. The
  kernel drops the lock when its holder dies (even by `kill -9`), so a stale file is detected
  by the lock being free, reported, and taken over; a clean exit empties the file.
- `fresh_start`: a run that starts at step 0 (`checkpoint.resume=none`, or nothing to resume)
  in a folder that holds an earlier run's metrics or checkpoints is refused unless
  `logging.existing` says what to do with them: `archive` (moved to
  `run_dir/archive/<time>/`) or `overwrite` (deleted). Either way no old checkpoint is left
  for a later run to resume and splice into this run's history.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from megatron_agpo.models.checkpoint import (
    CheckpointError,
    broadcast_error,
    complete_checkpoints,
)
from megatron_agpo.parallel import global_rank

LOCK = ".agpo-run.lock"
EXISTING = ("refuse", "archive", "overwrite")
# What a run leaves in its folder (docs/TRAINING.md): archived or deleted together.
HISTORY = (
    "metrics.jsonl",
    "checkpoints",
    "curves.png",
    "config.json",
    "tensorboard",
    "replica_logs",
    "wandb",
)


class RunFolderError(CheckpointError):
    """The run folder is in use by another run, or holds history this run would erase."""


def collective(fn):
    """Run fn on rank 0; every rank gets its verdict (RunFolderError) or its result there."""
    err, out = None, None
    if global_rank() == 0:
        try:
            out = fn()
        except CheckpointError as e:
            err = str(e)
    try:
        broadcast_error(err)
    except CheckpointError as e:
        raise RunFolderError(str(e)) from None
    return out


class RunLock:
    """The open, locked lock file of this run (rank 0); `release` empties and unlocks it."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        got = json.loads(raw)
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


def _describe(h: dict) -> str:
    started = h.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')} (started {when})"


def _take(run_dir: Path, log) -> RunLock:
    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunFolderError(
            f"{run_dir} is in use by another run: {_describe(holder)} holds {path}. Stop that "
            "run first, or give this one another logging.run_dir"
        ) from None
    stale = _holder(fd)
    if stale:
        log(
            f"run folder {run_dir}: taking over the lock of a run that is gone "
            f"({_describe(stale)}; it ended without releasing it)"
        )
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return RunLock(fd, path)


def claim(run_dir: Path, log=print) -> RunLock:
    """Collective: rank 0 locks the run folder (RunFolderError on every rank when another
    run holds it); other ranks get an empty RunLock."""
    lock = collective(lambda: _take(Path(run_dir), log))
    return lock if lock is not None else RunLock(None, Path(run_dir) / LOCK)


def history(run_dir: Path) -> list[str]:
    """What an earlier run left in run_dir that a fresh start would erase or mix with."""
    run_dir = Path(run_dir)
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = sum(1 for line in metrics.read_bytes().split(b"\n") if line.strip())
        if lines:
            found.append(f"metrics.jsonl with {lines} lines")
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    if ckpts:
        found.append(f"checkpoints {', '.join(p.name for p in ckpts)}")
    return found


def _fresh_start(run_dir: Path, existing: str, resume: str, log) -> None:
    found = history(run_dir)
    if not found:
        return
    why = "checkpoint.resume=none" if resume == "none" else "no checkpoint to resume"
    if existing not in EXISTING[1:]:
        raise RunFolderError(
            f"{run_dir} holds an earlier run's history ({'; '.join(found)}) and this run starts "
            f"at step 0 ({why}): it would erase it. Set logging.existing=archive (moved to "
            f"{run_dir}/archive/<time>/) or logging.existing=overwrite (deleted), or give this "
            "run another logging.run_dir"
        )
    names = [n for n in HISTORY if (run_dir / n).exists()]
    if existing == "archive":
        dest = run_dir / "archive" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=False)
        for n in names:
            (run_dir / n).rename(dest / n)
        log(f"logging.existing=archive: moved the earlier run's {', '.join(names)} to {dest}")
    else:
        for n in names:
            p = run_dir / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        log(f"logging.existing=overwrite: deleted the earlier run's {', '.join(names)}")


def fresh_start(run_dir: Path, existing: str, resume: str, log=print) -> None:
    """Collective, for a run starting at step 0: refuse (RunFolderError on every rank), or
    archive / delete the earlier run's history as `logging.existing` says."""
    collective(lambda: _fresh_start(Path(run_dir), existing, resume, log))
