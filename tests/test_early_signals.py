"""Preemption signals from the first moment: a signal sent to a rank before any handler of
its own exists (the launcher started torchrun, torchrun the rank, which is still importing)
is not lost; SIGTERM to every process of the job at once saves like SIGTERM to the launcher;
a signal before the first step exits 75 saying there is nothing to save."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_agpo.launcher import children_of
from megatron_agpo.trainer.preemption import EXIT_PREEMPTED, Preempted, Preemption

REPO = Path(__file__).resolve().parent.parent

# torchrun's stand-in: starts one rank, exits 1 when it fails (as torchrun does).
FAKE_TORCHRUN = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
sys.exit(0 if rank.wait() == 0 else 1)
"""
# A rank that is slow to start (imports), then runs the trainer's first line; a signal that
# came during its start-up must be there. "Trains" for 20 s otherwise and exits 0.
SLOW_RANK = """
import os, sys, time
from pathlib import Path
Path(os.environ["READY"]).write_text(str(os.getpid()))
time.sleep(2.0)  # importing torch and megatron: no handler of ours yet
from megatron_agpo.early_signals import catch_early, take_pending
from megatron_agpo.launcher import write_exit_status
catch_early()
t0 = time.time()
while time.time() - t0 < 20:
    got = take_pending()
    if got:
        write_exit_status(75, signal=got[0])
        sys.exit(75)
    time.sleep(0.05)
sys.exit(0)
"""


def _launcher(ready: Path) -> subprocess.Popen:
    code = (
        "import os, sys; from megatron_agpo.launcher import run_ranks; "
        f"sys.exit(run_ranks([sys.executable, '-c', {FAKE_TORCHRUN!r}, {SLOW_RANK!r}], "
        "dict(os.environ)))"
    )
    env = dict(os.environ, READY=str(ready), PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def _wait(path: Path, timeout: float = 60) -> int:
    t0 = time.time()
    while not path.exists() or not path.read_text():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)
    return int(path.read_text())


def _kill_all(proc, pids) -> None:
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["launcher", "every_process"])
def test_signal_during_rank_startup_is_kept(tmp_path, target):
    ready = tmp_path / "ready"
    proc = _launcher(ready)
    rank = _wait(ready)
    (torchrun,) = children_of(proc.pid)
    try:
        if target == "launcher":
            proc.send_signal(signal.SIGUSR1)
        else:  # a scheduler's signal to every process of the job, at once
            for pid in (proc.pid, torchrun, rank):
                os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == EXIT_PREEMPTED  # before: 0, the signal was ignored
    finally:
        _kill_all(proc, [torchrun, rank])


def test_signal_before_the_first_step_exits_75_with_nothing_to_save(capsys, monkeypatch):
    from megatron_agpo.early_signals import catch_early
    from megatron_agpo.trainer.loop import Trainer

    monkeypatch.delenv("AGPO_EXIT_STATUS_FILE", raising=False)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        catch_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # while the model is still being built
        p = Preemption()
        p.install()  # takes over what was caught before it
        fake = SimpleNamespace(cfg=None, preemption=p, rank=0, step=0)
        fake._preempted_at_start = lambda: Trainer._preempted_at_start(fake)
        with pytest.raises(Preempted) as e:
            Trainer.run(fake)
        assert e.value.code == EXIT_PREEMPTED
        out = capsys.readouterr().out
        assert "preempted (SIGUSR1) before the first step: nothing to save (no step ran)" in out
        p.uninstall()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
