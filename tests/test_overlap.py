"""Generation overlapping training (trainer.max_staleness): the stream's data positions, the
staleness filter and metrics, mixed-version records, the config checks, and the pool's
submit / collect with a weight sync landing while a request is in flight (stand-in replicas:
the real worker and pool, no vLLM)."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_agpo.rollout import RolloutRequest
from megatron_agpo.rollout.types import RolloutBatch, Sample, StaleWeightsError
from megatron_agpo.rollout.wire import sample_from_json, sample_to_json
from megatron_agpo.trainer.overlap import RolloutStream, drop_stale, staleness_metrics
from megatron_agpo.trainer.records import ScoredRollouts


def _sample(pid, k, version, n_tok=3, token_versions=()):
    return Sample(pid, k, (1, 2), tuple(range(n_tok)), "", (-0.5,) * n_tok, "stop", False,
                  version, tuple(token_versions))  # fmt: skip


class _Data:
    """A prompt iterator stand-in: batches of consecutive integers; state = the position."""

    def __init__(self, size=2):
        self.pos, self.size = 0, size

    def next_batch(self):
        out = list(range(self.pos, self.pos + self.size))
        self.pos += self.size
        return out

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_stream_keeps_k_plus_one_in_flight_and_the_oldest_position():
    data = _Data()
    st = RolloutStream(2, data, start_index=5)
    calls = []
    st.top_up(lambda p, i: calls.append((p, i)) or len(calls), version=0, most=10)
    # k + 1 = 3 batches, stream positions 5, 6, 7, prompts drawn in order.
    assert calls == [([0, 1], 5), ([2, 3], 6), ([4, 5], 7)]
    assert st.position() == (5, {"pos": 0})  # a checkpoint now regenerates all three
    assert st.pop().ticket == 1 and st.position() == (6, {"pos": 2})
    st.top_up(lambda p, i: calls.append((p, i)) or len(calls), version=1, most=10)
    assert calls[-1] == ([6, 7], 8) and len(st.pending) == 3
    # Near the run's end nothing is sampled past it; an empty stream still gets one (refill).
    st2 = RolloutStream(3, _Data(), 0)
    st2.top_up(lambda p, i: i, 0, most=2)
    assert [p.index for p in st2.pending] == [0, 1]
    st2.pop(), st2.pop()
    st2.top_up(lambda p, i: i, 0, most=0)
    assert [p.index for p in st2.pending] == [2]
    with pytest.raises(ValueError, match="k >= 1"):
        RolloutStream(0, _Data(), 0)


def test_drop_stale_drops_whole_groups_beyond_the_bound():
    # Trainer at version 5, k = 1: versions 4 and 5 are fine, 3 is not. Group size 2.
    samples = [
        _sample(0, 0, 5), _sample(0, 1, 4),                       # kept
        _sample(1, 0, 5), _sample(1, 1, 3),                       # dropped (one too old)
        _sample(2, 0, 4), _sample(2, 1, 3, token_versions=(3, 4, 5)),  # oldest token: 3
        _sample(3, 0, 4, token_versions=(4, 4, 5)), _sample(3, 1, 5),  # kept
    ]  # fmt: skip
    batch = RolloutBatch.from_samples(samples, allow_mixed=True)
    kept, dropped = drop_stale(batch, 5, 1, 2)
    assert dropped == 4
    assert [s.prompt_id for s in kept.samples] == [0, 0, 3, 3]
    assert drop_stale(batch, 5, 2, 2) == (batch, 0)  # k = 2: nothing is too old
    assert drop_stale(batch, 9, 1, 2) == (None, 8)


def test_mixed_versions_only_when_allowed_and_token_versions_travel():
    a, b = _sample(0, 0, 1), _sample(0, 1, 2, token_versions=(2, 2, 3))
    with pytest.raises(StaleWeightsError, match="mixes weight versions"):
        RolloutBatch.from_samples([a, b])
    batch = RolloutBatch.from_samples([a, b], allow_mixed=True)
    assert batch.weight_version == 1 and batch.samples[1].versions() == (2, 2, 3)
    assert a.versions() == (1, 1, 1)
    assert sample_from_json(sample_to_json(b)) == b  # over the wire, unchanged
    with pytest.raises(ValueError, match="2 token versions for 3 tokens"):
        _sample(0, 0, 1, token_versions=(1, 2))


def test_scored_rollouts_carry_token_versions_and_metrics_count_them():
    s = ScoredRollouts.from_lists([[1], [2], [3], [4]], [[5, 6], [7], [8, 9, 10], []],
                                  [[0.0] * 2, [0.0], [0.0] * 3, []], [False] * 4,
                                  [1.0, 0.0, 1.0, 0.0], 3, 2)  # fmt: skip
    s.token_versions = torch.tensor([3, 4, 4, 5, 4, 4])
    assert s.sample_versions().tolist() == [3, 4, 4, 3]  # empty response: the batch's 3
    part = s.select(torch.tensor([2, 3]))
    assert part.token_versions.tolist() == [5, 4, 4]
    both = ScoredRollouts.concat([part, s.select(torch.tensor([0, 1]))])
    assert both.token_versions.tolist() == [5, 4, 4, 3, 4, 4]
    plain = ScoredRollouts.from_lists([[1], [2]], [[5], [6]], [[0.0], [0.0]], [False] * 2,
                                      [1.0, 0.0], 7, 2)  # fmt: skip
    mixed = ScoredRollouts.concat([part, plain])
    assert mixed.token_versions.tolist() == [5, 4, 4, 7, 7]

    m = staleness_metrics(s.token_versions, s.sample_versions(), trainer_version=5,
                          max_staleness=2)  # fmt: skip
    # Sample staleness 2, 1, 1, 2; token staleness 2, 1, 1, 0, 1, 1.
    assert m["staleness/samples_0"] == 0 and m["staleness/samples_1"] == 2
    assert m["staleness/samples_2"] == 2 and m["staleness/max"] == 2
    assert m["staleness/mean"] == pytest.approx(1.5)
    assert m["staleness/tokens_0"] == pytest.approx(1 / 6)
    assert m["staleness/tokens_1"] == pytest.approx(4 / 6)
    assert m["staleness/tokens_2"] == pytest.approx(1 / 6)


def test_config_refuses_bad_overlap_settings():
    from megatron_agpo.trainer.config import TrainConfig

    cfg = TrainConfig()
    assert cfg.trainer.max_staleness == 0 and cfg.rollout.partial == "finish"
    assert not [p for p in cfg.problems() if "staleness" in p or "partial" in p]
    cfg.trainer.max_staleness = -1
    assert "trainer.max_staleness=-1: must be >= 0 (0: synchronous)" in cfg.problems()
    cfg.trainer.max_staleness = 1
    cfg.rollout.mode = "colocated"
    found = cfg.problems()
    assert any(p.startswith("trainer.max_staleness=1 needs rollout.mode=replicas") for p in found)
    cfg.rollout.partial = "resume"
    assert any(p.startswith("rollout.partial=resume needs rollout.mode=replicas")
               for p in cfg.problems())  # fmt: skip
    cfg.rollout.partial = "later"
    assert "rollout.partial='later': finish or resume" in cfg.problems()


@pytest.mark.dist
def test_pool_submit_collect_overlaps_and_a_sync_waits_for_the_request(tmp_path):
    """submit returns at once; the replica generates while the caller works; a weight sync
    sent meanwhile is taken after the request (partial=finish), so its samples carry the
    old version; a synchronous generate and prompt_logprobs in between leave the submitted
    reply where collect finds it; the replica reports its idle time."""
    from tests.test_rollout_pool import _Run, _weights

    run = _Run(tmp_path, n=1, delays=[(0, 1.5)])
    try:
        pool = run.pool
        t0 = time.monotonic()
        ticket = pool.submit([RolloutRequest([1, 2, 3]), RolloutRequest([4, 5])])
        assert time.monotonic() - t0 < 1.0  # did not wait for the 1.5 s generation
        pool.update_weights(iter(_weights()), 1)  # waits for the request, then loads
        assert time.monotonic() - t0 >= 1.5
        assert pool.weight_versions == [1]
        second = pool.submit([RolloutRequest([7, 8])])
        fresh = pool.generate([RolloutRequest([9])], expected_version=1)
        assert fresh.samples[0].weight_version == 1
        batch = pool.collect(ticket)
        assert [s.response_token_ids for s in batch.samples] == [(3, 2, 1), (5, 4)]
        assert {s.weight_version for s in batch.samples} == {0}  # sampled before the sync
        assert pool.collect(second).samples[0].weight_version == 1
        assert pool.replica_idle_s[0] > 0.0
    finally:
        run.close()
