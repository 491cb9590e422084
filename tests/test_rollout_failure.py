"""A replica failure ends the run on every rank with an emergency checkpoint.

Only rank 0 talks to the rollout engine; the other ranks wait in the broadcast of the scored
rollouts. `broadcast_scored` carries a failure flag (and rank 0's one-line message), so every
rank raises the same `RolloutFailed` instead of waiting forever, and `Trainer.run` saves the
last completed step (checkpoint.save_on_failure) and exits 69."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_agpo.rollout.types import RolloutError
from megatron_agpo.trainer.records import RolloutFailed, ScoredRollouts, broadcast_scored
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parent.parent
MESSAGE = "replica 0 (pid 4242) exited with code -9 during generate"


def _record() -> ScoredRollouts:
    return ScoredRollouts.from_lists(
        [[1, 2], [1, 2]], [[3], [4, 5]], [[-0.5], [-0.25, -1.0]], [False, True], [1.0, 0.0],
        weight_version=3, group_size=2,
    )  # fmt: skip


def _failure_flag(rank: int, world_size: int) -> None:
    cpu = torch.device("cpu")
    for _ in range(2):  # the group stays usable: a failure leaves nothing in flight
        with pytest.raises(RolloutFailed) as caught:
            broadcast_scored(None, cpu, failure=MESSAGE if rank == 0 else None)
        assert str(caught.value) == MESSAGE, (rank, str(caught.value))
        got = broadcast_scored(_record() if rank == 0 else None, cpu)
        assert got.rewards.tolist() == [1.0, 0.0] and got.weight_version == 3
        assert got.response_tokens.tolist() == [3, 4, 5]


@pytest.mark.dist
def test_broadcast_scored_failure_flag_raises_on_every_rank():
    run_distributed(_failure_flag, 2, timeout=120)


def test_broadcast_scored_failure_single_process():
    with pytest.raises(RolloutFailed, match="exited with code -9"):
        broadcast_scored(None, torch.device("cpu"), failure=MESSAGE)


# ------------------------------------------------------------------ the trainer's failure path
class _DeadEngine:
    """A pool whose replica died: every call fails as ReplicaPool's do."""

    def __init__(self, consume: int = 0) -> None:
        self.calls, self.consume = [], consume

    def _fail(self, op: str):
        self.calls.append(op)
        raise RolloutError(
            f"replica 0 (pid 4242) exited with code -9 during {op}; log tail:\nvLLM said this"
        )

    def wake_up(self):
        self.calls.append("wake_up")

    def generate(self, reqs, expected_version=None):
        self._fail("generate")

    def sleep(self):
        self._fail("sleep")

    def update_weights(self, tensors, version):
        for _ in range(self.consume):
            next(tensors)
        self._fail("update_weights")


def _trainer(engine, step: int = 2, saved_step: int = 0, **checkpoint):
    from megatron_agpo.data.iterator import PromptIterator
    from megatron_agpo.trainer.config import TrainConfig
    from megatron_agpo.trainer.loop import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = TrainConfig()
    for k, v in checkpoint.items():
        setattr(t.cfg.checkpoint, k, v)
    prompts = [SimpleNamespace(prompt_ids=[1, i + 2], ground_truth=str(i)) for i in range(10)]
    t.data = PromptIterator(prompts, batch_size=t.cfg.data.prompts_per_step, seed=0)
    t.rank, t.engine, t.device = 0, engine, torch.device("cpu")
    t.step, t.version, t._saved_step = step, step, saved_step
    t.run_dir = Path("/nonexistent/run")
    return t


def test_failed_rollout_raises_and_rewinds_the_step_prompts():
    from megatron_agpo.trainer.loop import Timer

    t = _trainer(_DeadEngine())
    t.data.next_batch()  # a step already consumed its prompts
    before = t.data.state_dict()
    with pytest.raises(RolloutFailed) as caught:
        t.collect(Timer())
    assert str(caught.value) == "replica 0 (pid 4242) exited with code -9 during generate"
    assert t.data.state_dict() == before  # a resume samples this step's prompts again
    assert t.engine.calls == ["wake_up", "generate"]
    with pytest.raises(RolloutFailed):  # the pool is never asked again
        t.collect(Timer())
    assert t.engine.calls == ["wake_up", "generate"]


def test_failed_weight_sync_finishes_the_gather_and_stops_at_the_next_rollout(monkeypatch):
    import megatron_agpo.models as models
    from megatron_agpo.trainer.loop import Timer

    yielded = []

    def gather(model, mcfg):  # the collective gather: every item must be consumed
        for i in range(5):
            yielded.append(i)
            yield f"w{i}", torch.zeros(1)

    monkeypatch.setattr(models, "gather_hf_tensors_to_rank0", gather)
    t = _trainer(_DeadEngine(consume=2))
    t.model = t.mcfg = None
    t.sync_weights(3)  # recorded, not raised: the other ranks are past the gather already
    assert yielded == [0, 1, 2, 3, 4] and t.version == 3
    with pytest.raises(RolloutFailed, match="during update_weights$"):
        t.collect(Timer())
    assert t.engine.calls == ["update_weights"]


def _failed(t, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as caught:
        t._rollout_failed(RolloutFailed(MESSAGE))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return caught.value.code, lines[0]


def test_rollout_failure_saves_the_last_completed_step_and_exits_69(monkeypatch, capsys):
    monkeypatch.delenv("AGPO_EXIT_STATUS_FILE", raising=False)
    t = _trainer(None, step=2)
    saved = []
    t.save = lambda: saved.append(t.step) or Path("/run/checkpoints/step_0000002")
    code, line = _failed(t, capsys)
    assert code == RolloutFailed.EXIT_CODE == 69 and saved == [2]
    assert line.startswith(f"agpo-train: error: rollout engine failed after step 2: {MESSAGE}")
    assert "checkpoint /run/checkpoints/step_0000002 (step 2); resume with the same command" in line
    assert line.endswith("; exit 69")

    t = _trainer(None, step=2, save_on_failure=False)
    t.save = lambda: pytest.fail("checkpoint.save_on_failure=false saved")
    code, line = _failed(t, capsys)
    assert code == 69 and "not saved (checkpoint.save_on_failure=false): steps 1-2 are lost" in line

    t = _trainer(None, step=2, saved_step=2)  # save_every saved it already
    t.save = lambda: pytest.fail("saved twice")
    code, line = _failed(t, capsys)
    assert code == 69 and "checkpoint /nonexistent/run/checkpoints/step_0000002 (step 2)" in line


def test_under_the_launcher_rank0_leaves_69_in_the_status_file(tmp_path, monkeypatch, capsys):
    from megatron_agpo.launcher import read_exit_status

    status = tmp_path / "status.json"
    monkeypatch.setenv("AGPO_EXIT_STATUS_FILE", str(status))
    t = _trainer(None, step=1)
    t.save = lambda: tmp_path / "step_0000001"
    code, _ = _failed(t, capsys)
    assert code == 0  # every rank exits 0: no torchrun traceback; the launcher exits 69
    got = read_exit_status(status)
    assert got["exit"] == 69 and got["step"] == 1 and got["path"] == str(tmp_path / "step_0000001")


def test_save_on_failure_must_be_a_bool():
    from megatron_agpo.trainer.config import TrainConfig

    cfg = TrainConfig()
    assert cfg.checkpoint.save_on_failure is True
    cfg.checkpoint.save_on_failure = "yes"
    with pytest.raises(ValueError, match="checkpoint.save_on_failure='yes': must be true or false"):
        cfg.validate()


# ------------------------------------------------------------------ end to end
def _descendants(pid: int) -> set[int]:
    from megatron_agpo.launcher import children_of

    out, todo = set(), [pid]
    while todo:
        for c in children_of(todo.pop()):
            out.add(c)
            todo.append(c)
    return out


def _replica_pids(pid: int) -> list[int]:
    out = []
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            if b"megatron_agpo.rollout.replica_worker" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(p)
    return alive


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return [r["step"] for r in rows if "reward/mean" in r]


def _kill_replica_after_steps(proc, run: Path, log: Path, steps: int = 1) -> tuple[int, set[int]]:
    """Once the run has logged `steps` steps (its launcher still alive), SIGKILL its one
    replica: the replica's pid and the run's process tree just before."""
    t0 = time.time()
    while len(_steps(run)) < steps:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() - t0 < 900, f"not {steps} steps after 900 s"
        time.sleep(0.2)
    tree = _descendants(proc.pid)
    (replica,) = _replica_pids(proc.pid)
    os.kill(replica, signal.SIGKILL)
    return replica, tree


@pytest.mark.e2e
@pytest.mark.engine
@pytest.mark.slow
def test_killed_replica_saves_the_last_step_and_exits_69(tmp_path):
    """The default CPU run (2 ranks, TP=2, one vLLM replica), save_every=0 and eval off: the
    replica is killed after the first step; both ranks stop, the last completed step is saved
    and the launcher exits 69 with one line naming the replica. (The same command resuming
    from that checkpoint, every step once: the overlapped run's killed replica in
    tests/test_overlap.py; a preempted run's in tests/test_preemption.py.)"""
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "megatron_agpo.train", "trainer.steps=20",
        "model.warmstart_steps=30", "trainer.eval_every=0", "data.prompts_per_step=4",
        f"logging.run_dir={run}", "logging.progress=false", "checkpoint.save_every=0",
    ]  # fmt: skip
    log = open(tmp_path / "out.log", "w+")  # noqa: SIM115 - read back below
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    tree: set[int] = set()
    try:
        replica, tree = _kill_replica_after_steps(proc, run, tmp_path / "out.log")
        rc = proc.wait(timeout=600)
        out = (tmp_path / "out.log").read_text()
        assert rc == 69, out[-3000:]
        done = _steps(run)
        last = done[-1]
        assert done == list(range(1, last + 1)) and last >= 1, done
        ckpt = run / "checkpoints" / f"step_{last:07d}"
        assert (ckpt / "COMPLETE").is_file(), out[-3000:]
        lines = [x for x in out.splitlines() if "rollout engine failed" in x]
        assert len(lines) == 1, out[-3000:]
        assert lines[0].startswith(
            f"agpo-train: error: rollout engine failed after step {last}: replica 0 (pid {replica})"
        ), lines[0]
        assert f"checkpoint {ckpt} (step {last}); resume with the same command; exit 69" in lines[0]
        assert "Traceback" not in out, out[-3000:]
        deadline = time.time() + 30  # nothing of the run is left behind
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(tree), f"left running: {_alive(tree)}"
    finally:
        for p in [proc.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        proc.wait()
