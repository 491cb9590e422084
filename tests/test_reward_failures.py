"""A dead or hung verifier never scores an answer 0: the answer is verified again on a fresh
worker (bounded retries); what still cannot be scored is NaN, its group leaves the batch,
it is counted, and too many in one batch stop the run with one clear message."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_agpo.registry import require_valid
from megatron_agpo.rewards import (
    MathReward,
    RewardConfig,
    RewardUnavailable,
    reward_counters,
    scored_groups,
)

FLAGS = Path(os.environ.get("AGPO_TEST_FLAGS", "/tmp"))


def flaky_verify(answer: str, ground_truth: str) -> bool:
    """Runs in the workers. 'die-once:<file>' kills its worker the first time (an OOM kill),
    'die' every time, 'hang-once:<file>' hangs the first time; otherwise compares text."""
    kind, _, flag = answer.partition(":")
    if kind in ("die-once", "hang-once") and not os.path.exists(flag):
        Path(flag).touch()
        if kind == "die-once":
            os._exit(9)
        time.sleep(3600)
    if kind == "die":
        os._exit(9)
    return (flag or answer).strip() != "" and ground_truth == "ok"


@pytest.mark.dist  # reward worker processes
def test_dead_and_hung_workers_are_replaced_and_the_answer_rescored(tmp_path):
    cfg = RewardConfig(num_workers=1, timeout_s=1.0, retries=2)
    with MathReward(cfg, verify_fn=flaky_verify) as r:
        # Before: a worker killed mid-verification scored the (correct) answer 0.
        assert r(rf"\boxed{{die-once:{tmp_path / 'a'}}}", "ok") == 1.0
        assert r(rf"\boxed{{hang-once:{tmp_path / 'b'}}}", "ok") == 1.0
        s = r.stats()
        assert (s.errors, s.timeouts, s.retries, s.unscored) == (1, 1, 2, 0)
        # A worker that dies on every try: unscored (NaN), never 0, and counted.
        assert math.isnan(r(r"\boxed{die}", "ok"))
        s = r.stats()
        assert (s.errors, s.retries, s.unscored) == (4, 4, 1)
        assert s.outcomes["error"] == 1
    assert reward_counters(s) == {
        "reward/errors": 4.0, "reward/timeouts": 1.0, "reward/retries": 4.0,
        "reward/unscored": 1.0,
    }  # fmt: skip


@pytest.mark.dist  # reward worker processes
def test_too_many_unscored_answers_stop_the_run():
    cfg = RewardConfig(num_workers=1, timeout_s=60.0, retries=0, max_unscored_fraction=0.25)
    with MathReward(cfg, verify_fn=flaky_verify) as r:
        scores = r.score_batch([r"\boxed{die}"] + [r"\boxed{x}"] * 3, ["ok"] * 4)
        assert math.isnan(scores[0]) and scores[1:] == [1.0] * 3  # 1 of 4: at the threshold
        with pytest.raises(RewardUnavailable, match=r"2 of 4 answers .* could not be scored"):
            r.score_batch([r"\boxed{die}"] * 2 + [r"\boxed{x}"] * 2, ["ok"] * 4)


def test_unscored_answers_drop_their_group_from_the_batch():
    from megatron_agpo.trainer.loop import Trainer

    nan = float("nan")
    assert scored_groups([1.0, 0.0, nan, 1.0, 0.0, 0.0], 2) == [0, 1, 4, 5]
    samples = [
        SimpleNamespace(prompt_id=i // 2, text=f"s{i}", prompt_token_ids=[1, 2],
                        response_token_ids=[3 + i], logprobs=[-0.5], truncated=False,
                        token_versions=[], weight_version=0)
        for i in range(6)
    ]  # fmt: skip
    scores = {"s0": 1.0, "s1": 0.0, "s2": nan, "s3": 1.0, "s4": 0.0, "s5": 1.0}
    reward = SimpleNamespace(score_batch=lambda texts, truths: [scores[t] for t in texts])
    cfg = SimpleNamespace(model=SimpleNamespace(router_replay="off"))
    fake = SimpleNamespace(rank=0, reward=reward, cfg=cfg)
    prompts = [SimpleNamespace(ground_truth="1")] * 3
    batch = SimpleNamespace(samples=samples, weight_version=0)
    scored = Trainer.score(fake, prompts, batch, 2)
    assert scored.num_groups == 2 and scored.rewards.tolist() == [1.0, 0.0, 0.0, 1.0]
    scores.update(s0=nan, s4=nan)
    with pytest.raises(RewardUnavailable, match="no group of this batch"):
        Trainer.score(fake, prompts, batch, 2)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="retries=-1: must be in"):
        require_valid(RewardConfig(retries=-1), "reward.math.")
    with pytest.raises(ValueError, match="max_unscored_fraction"):
        require_valid(RewardConfig(max_unscored_fraction=1.5), "reward.math.")


OWNER = """
import sys, threading, time
from pathlib import Path
from megatron_agpo.rewards import DeadlinePool
from tests.test_reward_failures import flaky_verify
pool = DeadlinePool(flaky_verify, num_workers=1, timeout_s=600)
threading.Thread(target=pool.call, args=("hang-once:" + sys.argv[1], "ok"), daemon=True).start()
while not Path(sys.argv[1]).exists():
    time.sleep(0.05)
print([w.proc.pid for w in pool._live][0], flush=True)
time.sleep(600)
"""


@pytest.mark.e2e  # a process that owns a pool, killed with SIGKILL
def test_verifier_workers_die_with_their_owner(tmp_path):
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path / "flag")], cwd=repo, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        worker = int(owner.stdout.readline())  # busy in a verification that never ends
        owner.kill()
        owner.wait()
        deadline = time.time() + 10
        while time.time() < deadline and Path(f"/proc/{worker}").exists():
            state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.1)
        else:
            assert not Path(f"/proc/{worker}").exists(), "the worker outlived its owner"
    finally:
        owner.kill()
        owner.wait()
        if "worker" in locals():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
