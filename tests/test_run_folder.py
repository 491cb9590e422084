"""One owner per run folder: a second run on a held folder is refused naming the holder's
host and pid, a lock left by a killed run is detected and taken over, and a start at step 0
in a folder with history is refused unless logging.existing archives or overwrites it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_agpo.registry import require_valid
from megatron_agpo.trainer import rundir
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from megatron_agpo.trainer import rundir
lock = rundir.claim(Path(sys.argv[1]), log=lambda m: None)
Path(sys.argv[2]).write_text("held")
time.sleep(600)
"""


def _holder(run_dir: Path, ready: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(ready)], cwd=REPO)
    t0 = time.time()
    while not ready.exists():
        assert proc.poll() is None and time.time() - t0 < 60
        time.sleep(0.05)
    return proc


@pytest.mark.dist  # a second process holds the lock
def test_second_run_is_refused_and_a_stale_lock_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _holder(run, tmp_path / "ready")
    try:
        with pytest.raises(rundir.RunFolderError) as e:
            rundir.claim(run)
        msg = str(e.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg, msg
        assert "in use by another run" in msg and "\n" not in msg
    finally:
        proc.send_signal(signal.SIGKILL)  # dies holding it: the file still names it
        proc.wait()
    assert json.loads((run / rundir.LOCK).read_text())["pid"] == proc.pid
    logs = []
    lock = rundir.claim(run, log=logs.append)
    assert "taking over the lock of a run that is gone" in logs[0] and str(proc.pid) in logs[0]
    assert json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()
    lock.release()  # a clean exit leaves an empty, free lock: no stale warning next time
    logs.clear()
    rundir.claim(run, log=logs.append).release()
    assert logs == []


def _history(run: Path) -> None:
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    done = run / "checkpoints" / "step_0000005"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("")
    (run / "config.json").write_text("{}")


def test_fresh_start_over_history_is_refused_archived_or_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rundir.fresh_start(run, "refuse", "auto")  # an empty folder: nothing to say
    _history(run)
    with pytest.raises(rundir.RunFolderError) as e:
        rundir.fresh_start(run, "refuse", "none")
    msg = str(e.value)
    assert "metrics.jsonl with 2 lines; checkpoints step_0000005" in msg, msg
    assert "checkpoint.resume=none" in msg and "logging.existing=archive" in msg
    assert "logging.existing=overwrite" in msg
    logs = []
    rundir.fresh_start(run, "archive", "none", log=logs.append)
    (dest,) = (run / "archive").iterdir()
    assert (dest / "checkpoints" / "step_0000005" / "COMPLETE").is_file()
    assert (dest / "metrics.jsonl").read_text().count("\n") == 2
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    _history(run)
    rundir.fresh_start(run, "overwrite", "auto", log=logs.append)
    assert rundir.history(run) == [] and not (run / "config.json").exists()
    assert "archive" in logs[0] and "overwrite" in logs[1]


def test_existing_setting_is_checked():
    from megatron_agpo.trainer.config import LoggingSection

    with pytest.raises(ValueError, match="refuse, archive or overwrite"):
        require_valid(LoggingSection(existing="keep"), "logging.")


def _two_ranks(rank, world, run):
    lock = rundir.claim(Path(run))
    with pytest.raises(rundir.RunFolderError, match="in use by another run"):
        rundir.claim(Path(run))  # rank 0's verdict on both ranks
    with pytest.raises(rundir.RunFolderError, match="holds an earlier run's history"):
        rundir.fresh_start(Path(run), "refuse", "auto")
    lock.release()


@pytest.mark.dist
def test_verdicts_reach_every_rank(tmp_path):
    _history(tmp_path)
    run_distributed(_two_ranks, 2, str(tmp_path))


@pytest.mark.dist  # a second process holds the lock
def test_trainer_start_on_a_held_folder_exits_2_naming_the_holder(tmp_path, capsys, monkeypatch):
    from megatron_agpo.trainer.loop import Trainer

    monkeypatch.delenv("AGPO_EXIT_STATUS_FILE", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    proc = _holder(run, tmp_path / "ready")
    fake = SimpleNamespace(
        cfg=SimpleNamespace(checkpoint=SimpleNamespace(resume="auto", resume_fallback=False)),
        run_dir=run, rank=0,
    )  # fmt: skip
    try:
        with pytest.raises(SystemExit) as e:
            Trainer._resume(fake)
    finally:
        proc.kill()
        proc.wait()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"agpo-train: error: {run} is in use by another run: pid {proc.pid}")
    assert "\n" not in err
