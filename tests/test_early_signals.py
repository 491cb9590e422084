"""Preemption signals from the first moment: a signal sent to a rank before any handler of
its own exists (the launcher started torchrun, torchrun the rank, which is still importing)
is not lost; a signal before the first step exits 75 saying there is nothing to save. SIGTERM
to every process of a running job at once: tests/test_preemption.py."""

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
        fake._run = lambda: Trainer._run(fake)
        with pytest.raises(Preempted) as e:
            Trainer.run(fake)
        assert e.value.code == EXIT_PREEMPTED
        out = capsys.readouterr().out
        assert "preempted (SIGUSR1) before the first step: nothing to save (no step ran)" in out
        p.uninstall()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# A rank whose resume is refused: rank 0 printed the one-line error.
REFUSED_RANK = """
import sys
from megatron_agpo.launcher import refused_exit
print("agpo-train: error: checkpoint refused", file=sys.stderr, flush=True)
sys.exit(refused_exit(2, 0))
"""


@pytest.mark.e2e
def test_refused_resume_exits_2_without_torchrun_failing(tmp_path):
    code = (
        "import os, sys; from megatron_agpo.launcher import run_ranks; "
        f"sys.exit(run_ranks([sys.executable, '-c', {FAKE_TORCHRUN!r}, {REFUSED_RANK!r}], "
        "dict(os.environ)))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    # torchrun saw its ranks succeed (so no traceback of failed children); the launcher says 2
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "agpo-train: error: checkpoint refused"


def test_torn_metrics_line_in_the_middle_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from megatron_agpo.trainer.loop import Trainer

    monkeypatch.delenv("AGPO_EXIT_STATUS_FILE", raising=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "re\n{"step": 3}\n')
    fake = SimpleNamespace(
        cfg=SimpleNamespace(checkpoint=SimpleNamespace(resume="auto", resume_fallback=False)),
        run_dir=tmp_path, rank=0, model=None, optimizer=None, mcfg=None,
    )  # fmt: skip
    with pytest.raises(SystemExit) as e:
        Trainer._resume(fake)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agpo-train: error: ") and "\n" not in err
    assert "metrics.jsonl line 2 is not JSON and is not the last line" in err
    fake.run_lock.release()
