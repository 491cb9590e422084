"""Preemption with real signals on the CPU default run (2 ranks, TP=2, a vLLM replica):
SIGTERM to every process of the run saves and exits 75, the requeued run counts every step
once. A kill -9
of the whole run's launcher leaving no process behind is tests/test_no_orphans.py's (one run
after a save, which has every process a run before its first save has, and the save's too)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_agpo.launcher import children_of

REPO = Path(__file__).resolve().parent.parent


def _cmd(run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "megatron_agpo.train", f"trainer.steps={steps}",
        "model.warmstart_steps=30", "trainer.eval_every=0", "data.prompts_per_step=8",
        f"logging.run_dir={run_dir}", "logging.progress=false", "checkpoint.save_every=0",
    ]  # fmt: skip


def _start(run_dir: Path, steps: int) -> subprocess.Popen:
    """The run, its output to a file (a pipe nobody reads would fill and block it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}-{time.time_ns()}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        _cmd(run_dir, steps), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    proc.log = log
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.log.flush()
    return Path(proc.log.name).read_text()


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return [r["step"] for r in rows if "reward/mean" in r]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float) -> None:
    t0 = time.time()
    while max(_steps(run_dir), default=0) < step:
        assert proc.poll() is None, _output(proc)[-3000:]
        assert time.time() - t0 < timeout, f"no step {step} after {timeout}s"
        time.sleep(0.2)


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for c in children_of(todo.pop()):
            out.add(c)
            todo.append(c)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


# A stand-in for torchrun: starts one "rank" and exits 1 when it fails, as torchrun does.
FAKE_TORCHRUN = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
sys.exit(0 if rank.wait() == 0 else 1)
"""
# A stand-in rank: dies with its parent; on SIGTERM, "saves" and exits 75 via the status file.
FAKE_RANK = """
import os, signal, sys, time
from pathlib import Path
from megatron_agpo.launcher import write_exit_status
from megatron_agpo.trainer.preemption import die_with_parent
die_with_parent()
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
# As a real rank does (Preemption.install): the launcher starts torchrun with these blocked.
signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGUSR1))
Path(os.environ["READY"]).write_text(str(os.getpid()))
while not got:
    time.sleep(0.05)
write_exit_status(75, step=3)
sys.exit(75)
"""


def _wait_file(path: Path, timeout: float = 30) -> str:
    t0 = time.time()
    while not path.exists() or not path.read_text():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def _launcher(ready: Path) -> subprocess.Popen:
    code = (
        "import os, sys; from megatron_agpo.launcher import run_ranks; "
        f"sys.exit(run_ranks([sys.executable, '-c', {FAKE_TORCHRUN!r}, {FAKE_RANK!r}], "
        "dict(os.environ)))"
    )
    env = dict(os.environ, READY=str(ready), PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def _reap(proc: subprocess.Popen, tree: set[int]) -> None:
    """A failed test leaves nothing running."""
    for pid in [proc.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.e2e
def test_launcher_forwards_sigterm_to_the_ranks_and_exits_75(tmp_path):
    proc = _launcher(tmp_path / "ready")
    rank = int(_wait_file(tmp_path / "ready"))
    tree = _descendants(proc.pid)
    try:
        (torchrun,) = children_of(proc.pid)
        assert children_of(torchrun) == [rank]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 75  # torchrun exited 1; the rank's status says 75
    finally:
        _reap(proc, tree)


@pytest.mark.e2e
def test_killed_launcher_takes_torchrun_and_ranks_down(tmp_path):
    proc = _launcher(tmp_path / "ready")
    rank = int(_wait_file(tmp_path / "ready"))
    tree = _descendants(proc.pid)
    try:
        assert rank in tree and len(tree) == 2
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(tree), f"orphans: {_alive(tree)}"
    finally:
        _reap(proc, tree)


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resume_counts_each_step_once(tmp_path):
    """A scheduler's SIGTERM to the whole job (launcher, torchrun, ranks, the vLLM replica and
    the reward workers at once), then a second one to the launcher during the step or the
    save: the run saves once and exits 75; the requeued run counts every step once. (The
    launcher alone signalled, forwarding to the ranks: test_launcher_forwards_sigterm_...)"""
    run = tmp_path / "run"
    proc = _start(run, 6)
    _wait_for_step(proc, run, 2, timeout=600)
    tree = _descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # a second signal during the step/save changes nothing
    proc.wait(timeout=300)
    out = _output(proc)
    assert proc.returncode == 75, out[-3000:]
    line = next(x for x in out.splitlines() if "preempted (SIGTERM): saved" in x)
    stopped = int(line.split(" at step ")[1].split(";")[0])
    assert line.endswith("; exit 75") and stopped >= 2
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "COMPLETE").is_file()
    assert _steps(run) == list(range(1, stopped + 1))
    deadline = time.time() + 30
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(tree), f"left running: {_alive(tree)}"

    proc = _start(run, 6)  # the requeued job
    proc.wait(timeout=600)
    out = _output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:07d}'}" in out
    assert _steps(run) == [1, 2, 3, 4, 5, 6]  # every step once
