"""A replica failure ends the run on every rank with an emergency checkpoint.

Only rank 0 talks to the rollout engine; the other ranks wait in the broadcast of the scored
rollouts. `broadcast_scored` carries a failure flag (and rank 0's one-line message), so every
rank raises the same `RolloutFailed` instead of waiting forever, and `Trainer.run` saves the
last completed step (checkpoint.save_on_failure) and exits 69."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
