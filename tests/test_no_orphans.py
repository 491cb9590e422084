"""A rank killed with SIGKILL leaves nothing of its checkpoint saves behind: megatron's
results Manager (a server process it used to start at the first save) is never started, and
the shard writers it forks during a save die with the rank."""

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

RANK = """
import json, os, sys, time
from pathlib import Path
from tests.dist_utils import free_port
hf, out = sys.argv[1], Path(sys.argv[2])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
from megatron_agpo.launcher import children_of
from megatron_agpo.models import build_model_from_hf
from megatron_agpo.models import checkpoint as fmt
from megatron_agpo.parallel import ParallelConfig, init_parallel
init_parallel(ParallelConfig())
model, cfg = build_model_from_hf(hf)
fmt.save_checkpoint(model, out / "a", cfg)
(out / "after_save.json").write_text(json.dumps(children_of(os.getpid())))
# The next save's writers hang (a stuck disk): the rank waits for them, and is killed.
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
FileSystemWriterAsync.write_preloaded_data = staticmethod(lambda *a, **k: time.sleep(600))
(out / "saving").write_text("")
fmt.save_checkpoint(model, out / "b", cfg)
"""


def _alive(pids) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


@pytest.mark.dist  # one gloo process that saves
def test_killed_rank_leaves_no_writer_or_manager(tmp_path):
    from tests.tiny_models import tiny_hf_model

    hf = tiny_hf_model(tmp_path / "hf")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    rank = subprocess.Popen([sys.executable, "-c", RANK, str(hf), str(tmp_path)], cwd=REPO, env=env)
    writers: list[int] = []
    try:
        t0 = time.time()
        while not (tmp_path / "saving").exists():
            assert rank.poll() is None, "the rank failed"
            assert time.time() - t0 < 240
            time.sleep(0.1)
        # After a complete save nothing of it runs on (before: megatron's Manager server).
        assert json.loads((tmp_path / "after_save.json").read_text()) == []
        while len(writers) < 1 and time.time() - t0 < 240:
            writers = children_of(rank.pid)
            time.sleep(0.1)
        assert writers, "the second save forked no writer"
        time.sleep(0.5)
        rank.kill()
        rank.wait()
        deadline = time.time() + 10
        while _alive(writers) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(writers), f"writers left running: {_alive(writers)}"
    finally:
        for pid in [rank.pid, *writers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        rank.wait()


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_killed_launcher_after_a_save_leaves_nothing(tmp_path):
    """The whole run (launcher, torchrun, 2 ranks, a vLLM replica, reward workers) after its
    first checkpoint: a kill -9 of the launcher leaves no process of it. (This run also stands
    for a kill -9 before any save: the processes of the run then are a subset of these.)"""
    from tests.test_preemption import _alive, _descendants, _output, _wait_for_step

    run = tmp_path / "run"
    run.mkdir()
    cmd = [
        sys.executable, "-m", "megatron_agpo.train", "trainer.steps=50",
        "model.warmstart_steps=30", "trainer.eval_every=0", "data.prompts_per_step=8",
        f"logging.run_dir={run}", "logging.progress=false", "checkpoint.save_every=1",
    ]  # fmt: skip
    log = open(tmp_path / "run.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    proc.log = log
    tree: set[int] = set()
    try:
        _wait_for_step(proc, run, 2, timeout=900)
        t0 = time.time()
        while not (run / "checkpoints" / "step_0000002" / "COMPLETE").exists():
            assert time.time() - t0 < 300, _output(proc)[-3000:]
            time.sleep(0.2)
        tree = _descendants(proc.pid)
        assert len(tree) >= 4, tree  # torchrun, two ranks, a vLLM replica (and their helpers)
        proc.kill()
        proc.wait()
        deadline = time.time() + 30
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(tree), f"orphans: {_alive(tree)}"
    finally:
        for pid in [proc.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
