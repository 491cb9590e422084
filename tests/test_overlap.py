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
    assert st.pop().ticket == 1 and st.position() == (5, {"pos": 0})  # taken, not trained
    st.commit()  # the step that took it completed
    assert st.position() == (6, {"pos": 2}) and not st.taken
    st.top_up(lambda p, i: calls.append((p, i)) or len(calls), version=1, most=10)
    assert calls[-1] == ([6, 7], 8) and len(st.pending) == 3
    # Near the run's end nothing is sampled past it; an empty stream still gets one (refill).
    st2 = RolloutStream(3, _Data(), 0)
    st2.top_up(lambda p, i: i, 0, most=2)
    assert [p.index for p in st2.pending] == [0, 1]
    st2.pop(), st2.pop()
    st2.commit()
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


def test_background_sync_is_on_exactly_where_it_can_be():
    from megatron_agpo.trainer.config import TrainConfig
    from megatron_agpo.trainer.config import background_sync_on as resolve

    cfg = TrainConfig()
    background_sync_on = lambda c: resolve(c.trainer, c.rollout)  # noqa: E731
    found = lambda: [p for p in cfg.problems() if "background_sync" in p]  # noqa: E731
    assert not background_sync_on(cfg)  # synchronous: the next rollout needs the weights
    cfg.trainer.max_staleness = 1
    assert background_sync_on(cfg)
    cfg.rollout.partial = "resume"
    assert not background_sync_on(cfg) and not found()
    cfg.trainer.background_sync = True
    assert found() == ["trainer.background_sync=true needs rollout.partial=finish: with resume "
                       "the next step's batch takes the new weights mid-response, so it waits "
                       "for the sync"]  # fmt: skip
    cfg.rollout.partial, cfg.trainer.max_staleness = "finish", 0
    assert [p.split(":")[0] for p in found()] == [
        "trainer.background_sync=true needs trainer.max_staleness >= 1"
    ]
    cfg.trainer.max_staleness, cfg.trainer.background_sync = 2, False
    assert not background_sync_on(cfg) and not found()


@pytest.mark.dist
def test_pool_submit_collect_overlaps_and_a_sync_waits_for_the_request(tmp_path):
    """submit returns at once; the replica generates while the caller works; a weight sync
    sent meanwhile is taken after the request (partial=finish), so its samples carry the
    old version; a synchronous generate and prompt_logprobs in between leave the submitted
    reply where collect finds it; the replica reports its idle time. Then the replica dies
    with two requests in flight: collect reports it after heartbeat_timeout_s (an external
    replica: no process to poll), and the pool takes no more requests."""
    import signal

    from megatron_agpo.rollout.types import RolloutError, RolloutTimeoutError
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
        # The reply was read (and kept) during the sync: collect takes it without waiting
        # for the next message (a 200 ms poll per step, the trainer idle, before the fix).
        pumps, pump = [], pool._pump
        pool._pump = lambda ms: pumps.append(ms) or pump(ms)
        batch = pool.collect(ticket)
        pool._pump = pump
        assert pumps == [0]
        assert [s.response_token_ids for s in batch.samples] == [(3, 2, 1), (5, 4)]
        assert {s.weight_version for s in batch.samples} == {0}  # sampled before the sync
        assert pool.collect(second).samples[0].weight_version == 1
        assert pool.replica_idle_s[0] > 0.0

        pool.config.heartbeat_timeout_s = 1.0
        third, fourth = pool.submit([RolloutRequest([1])]), pool.submit([RolloutRequest([2])])
        time.sleep(0.3)  # mid-request
        run.procs[0].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        silent = r"replica 0 .*no heartbeat .*during generate"
        with pytest.raises(RolloutTimeoutError, match=silent):
            pool.collect(third)
        assert 1.0 <= time.monotonic() - t0 < 2.5
        with pytest.raises(RolloutError, match="replica 0 .*failed earlier: .*no heartbeat"):
            pool.submit([RolloutRequest([3])])
        pool.cancel(fourth)
    finally:
        run.close()


def _train_rows(run_dir):
    import json

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def _killed_mid_stream(run, steps, *extra, after: int = 1) -> int:
    """agpo-train (tests/runs.py's short run) whose vLLM replica is SIGKILLed once `after`
    steps are logged; checks the run stops as a replica failure does (exit 69, one line, the
    last step saved, nothing left running) and returns that step."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    from tests.runs import REPO, SHORT
    from tests.test_rollout_failure import _alive, _kill_replica_after_steps, _steps

    cmd = [sys.executable, "-m", "megatron_agpo.train", f"trainer.steps={steps}", *SHORT,
           f"logging.run_dir={run}", *extra]  # fmt: skip
    log = run.parent / f"{run.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    tree: set[int] = set()
    try:
        replica, tree = _kill_replica_after_steps(proc, run, log, steps=after)
        rc = proc.wait(timeout=600)
        text = log.read_text()
        assert rc == 69, text[-3000:]
        done = _steps(run)
        last = done[-1]
        assert done == list(range(1, last + 1)) and last < steps, done
        ckpt = run / "checkpoints" / f"step_{last:07d}"
        assert (ckpt / "COMPLETE").is_file(), text[-3000:]
        lines = [x for x in text.splitlines() if "rollout engine failed" in x]
        assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
        assert lines[0].startswith(
            f"agpo-train: error: rollout engine failed after step {last}: replica 0 (pid {replica})"
        ), lines[0]
        assert f"checkpoint {ckpt} (step {last}); resume with the same command; exit 69" in lines[0]
        deadline = time.time() + 30
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(tree), f"left running: {_alive(tree)}"
        return last
    finally:
        for p in [proc.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        proc.wait()


def _state(run_dir, step):
    import json

    path = run_dir / "checkpoints" / f"step_{step:07d}" / "trainer_state.json"
    return json.loads(path.read_text())


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_overlapped_run_bounds_staleness_and_resumes_at_the_untrained_batch(tmp_path):
    """agpo-train with trainer.max_staleness=1 on a vLLM replica: every trained sample is at
    most one version old (after the first step exactly one: the next batch was sampled while
    the trainer updated), the metrics say so, and the held-out evaluation runs. A checkpoint
    stores the oldest untrained batch's data position although the next batch was already in
    flight. A second run, the same with the sync blocking (trainer.background_sync=false) and
    one step more, equals the first bit for bit until its replica is killed mid-stream (once
    step 3 is logged: the next batch is in flight); it stops as the synchronous loop does:
    exit 69, one line naming the replica, the last completed step saved with the position of
    the oldest untrained batch, nothing left running; the same command resumes it, every step
    logged once, and at step 4 it holds the data position and stream position of the run that
    was not stopped."""
    from tests.runs import train

    k1 = ("trainer.max_staleness=1",)
    all_rows = train(tmp_path / "a", 4, *k1)
    rows = [r for r in all_rows if "staleness/max" in r]
    assert [r["step"] for r in all_rows if "eval/pass@1" in r] == [0, 2, 4]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["staleness/samples_0"] == 64 and rows[0]["staleness/max"] == 0
    for r in rows[1:]:
        assert r["staleness/samples_1"] == 64 and r["staleness/tokens_1"] == 1.0
    for r in rows:
        assert r["staleness/dropped"] == 0 and r["time/trainer_idle"] >= 0
        assert 0 < r["is/weight_max"] <= 2.0 and "time/replica_idle" in r
    # The weight sync ran beside the next step (trainer.background_sync, on by default here):
    # each row from the second has joined the sync before it (at its optimizer step, or at the
    # evaluation's first engine call, which waits for all of it: no bound on the wait here).
    for r in rows[1:]:
        assert r["time/sync_background"] > 0 and r["time/sync_exposed"] >= 0
        assert r["time/sync_wait"] > 0
    a = _state(tmp_path / "a", 2)  # batch 3 was in flight: not consumed
    assert a["stream"] == 2 and a["data"]["offset"] == 2 * 8
    # The same run with the sync blocking the step (5 steps), its replica killed once step 3
    # is logged: step 3 is the first to train on a batch sampled after a sync.
    blocking = (*k1, "trainer.background_sync=false")
    last = _killed_mid_stream(tmp_path / "b", 5, *blocking, after=3)
    # Up to there the background sync changed nothing but the timing: the same samples train
    # the same weights (every value of steps 1-3, bit for bit; the killed run may also have
    # finished step 4, which is the other run's last and logs its end).
    skip = ("time/", "tokens_per_s")
    same = lambda rs: [{k: v for k, v in r.items() if not k.startswith(skip)}  # noqa: E731
                       for r in rs if r["step"] <= 3]  # fmt: skip
    b_rows = _train_rows(tmp_path / "b")
    assert last >= 3 and same(b_rows) == same(rows)
    assert all("time/sync_background" not in r for r in b_rows)
    b = _state(tmp_path / "b", last)  # the in-flight batch is regenerated on resume
    assert b["stream"] == last and b["data"]["offset"] == last * 8
    train(tmp_path / "b", 5, *blocking)  # the same command resumes from the last checkpoint
    assert [r["step"] for r in _train_rows(tmp_path / "b")] == [1, 2, 3, 4, 5]
    assert _state(tmp_path / "b", 5)["data"]["offset"] == 5 * 8
    b, a4 = _state(tmp_path / "b", 4), _state(tmp_path / "a", 4)
    assert (b["stream"], b["data"]) == (a4["stream"], a4["data"]) == (4, a4["data"])
    assert a4["data"]["offset"] == 4 * 8


def _stream_of_stubs(t, submit, collect) -> None:
    """Give a stub trainer a k = 1 stream at position 7 over 100 one-token prompts (3 a
    batch) and an engine of the two given stand-ins."""
    import types

    from megatron_agpo.data.iterator import PromptIterator
    from megatron_agpo.trainer.overlap import RolloutStream

    t.data = PromptIterator([types.SimpleNamespace(prompt_ids=(p + 5,)) for p in range(100)],
                            batch_size=3, shuffle=False)  # fmt: skip
    t.engine = types.SimpleNamespace(submit=submit, collect=collect)
    t.stream = RolloutStream(1, t.data, start_index=7)


def test_overlapped_collect_refills_from_the_stream_and_drops_stale_groups():
    """The trainer's collect under overlap (a stand-in engine: submit records, collect returns
    samples of the version each batch was 'sampled' at): k + 1 batches in flight, dynamic
    sampling's refill is the stream's next batch (its seeds keyed by its stream position),
    groups past the bound are dropped and counted, and the checkpoint position is the oldest
    batch not yet trained."""

    from megatron_agpo.trainer.loop import Timer
    from tests.test_trainer_features import _stub_trainer

    m = [1.0, 0, 0, 0]  # a mixed group (kept by dynamic sampling)
    r = [1.0] * 4  # all right: dropped by dynamic sampling
    t = _stub_trainer(["trainer.dynamic_sampling=zero_advantage", "trainer.max_staleness=1",
                       "trainer.steps=10"], [r + r + m, m + m])  # fmt: skip
    t.version, t._engine_failure = 3, None
    submitted, versions = [], {}

    def submit(reqs, partial):
        submitted.append((len(reqs), reqs[0].seed, partial))
        return len(submitted)

    def collect(ticket):
        # Batch 1's second group was sampled at version 1 (2 behind: dropped at k = 1).
        v = [3, 1, 3] if ticket == 1 else [2, 2, 2]
        versions[ticket] = v
        return RolloutBatch.from_samples(
            [Sample(p, j, (p,), (p, j), "", (-1.0, -1.0), "stop", False, v[p % 3])
             for p in range(3) for j in range(4)],
            allow_mixed=True,
        )  # fmt: skip

    _stream_of_stubs(t, submit, collect)
    seen, rounds = [], iter([m + r, m + m + r])

    def score(prompts, batch, n):
        samples = batch.samples
        seen.append([s.weight_version for s in samples][::4])
        rewards = next(rounds)
        return ScoredRollouts.from_lists(
            [s.prompt_token_ids for s in samples], [s.response_token_ids for s in samples],
            [s.logprobs for s in samples], [False] * len(samples), rewards[: len(samples)],
            batch.weight_version, n,
        )  # fmt: skip

    t.score = score
    out, stats = t.collect(Timer())
    # Round 1 = stream batch 7 (prompts 0-2), round 2 = batch 8 (3-5); two submitted at
    # first (k + 1), one more for the refill: batch 9 stays in flight.
    assert len(submitted) == 3 and [p.index for p in t.stream.pending] == [9]
    assert submitted[0][2] == "finish"
    from megatron_agpo.trainer.loop import sampling_seed

    assert submitted[1][1] == sampling_seed(t.cfg.trainer.seed, 8, 0)
    assert seen[0] == [3, 3] and stats["staleness/dropped"] == 4  # the version-1 group
    assert t.stream.dropped_total == 4
    assert stats["sampling/rounds"] == 2 and stats["groups/kept"] == 3
    # Until the step completes its two batches are untrained: a checkpoint regenerates them.
    assert t.stream.position()[0] == 7 and t.stream.position()[1]["offset"] == 0
    t.stream.commit()  # the step completed (train_step)
    assert t.stream.position()[0] == 9 and t.stream.position()[1]["offset"] == 6
    assert t.data.state_dict()["offset"] == 9  # batch 9's prompts are drawn (in flight)


def test_replica_dying_mid_stream_stops_the_step_and_keeps_its_batches_untrained():
    """A replica dies while batches are in flight; the engine's collect raises as
    ReplicaPool's does, here in a dynamic-sampling refill round, after the step's first batch
    was scored. Every rank stops with the one-line RolloutFailed (the run then saves the last
    completed step and exits 69), the engine is not asked again, and the checkpoint position
    is the first batch the failed step took: a resume regenerates every batch of the step,
    not only the one whose replica died. Then the same after a completed step, the failure
    in its first round: the position is the next untrained batch."""

    from megatron_agpo.data.iterator import PromptIterator
    from megatron_agpo.rollout.types import RolloutError
    from megatron_agpo.trainer.loop import Timer
    from megatron_agpo.trainer.records import RolloutFailed
    from tests.test_trainer_features import _stub_trainer

    m, r = [1.0, 0, 0, 0], [1.0] * 4  # a mixed group (kept), an all-right one (dropped)
    t = _stub_trainer(["trainer.dynamic_sampling=zero_advantage", "trainer.max_staleness=1",
                       "trainer.steps=10"], [m + r + r, m + m + m, m + m + m])  # fmt: skip
    t.version, t._engine_failure = 3, None
    calls, dead = [], {2}

    def submit(reqs, partial):
        calls.append("submit")
        return calls.count("submit")

    def collect(ticket):
        calls.append(f"collect {ticket}")
        if ticket in dead:
            raise RolloutError("replica 1 (pid 4242) exited with code -9 during generate; "
                               "log tail:\nvLLM said this")  # fmt: skip
        return RolloutBatch.from_samples(
            [Sample(p, j, (p,), (p, j), "", (-1.0, -1.0), "stop", False, 3)
             for p in range(3) for j in range(4)],
            allow_mixed=True,
        )  # fmt: skip

    _stream_of_stubs(t, submit, collect)
    rewards = iter([m + r + r, m + m + m, m + m + m])

    def score(prompts, batch, n):
        if batch is None:  # the engine failed: nothing to score
            return None
        s = batch.samples
        return ScoredRollouts.from_lists(
            [x.prompt_token_ids for x in s], [x.response_token_ids for x in s],
            [x.logprobs for x in s], [False] * len(s), next(rewards), batch.weight_version, n,
        )  # fmt: skip

    t.score = score
    start = t.data.state_dict()
    with pytest.raises(RolloutFailed) as caught:
        t.collect(Timer())
    assert str(caught.value) == "replica 1 (pid 4242) exited with code -9 during generate"
    # Batch 7 (ticket 1) was scored; the refill topped the stream up (batch 9) and batch 8
    # (ticket 2) failed: 7 and 8 are untrained, 9 was in flight.
    assert calls == ["submit", "submit", "collect 1", "submit", "collect 2"]
    assert t.stream.position() == (7, start)
    with pytest.raises(RolloutFailed):  # the engine is never asked again
        t.collect(Timer())
    assert calls == ["submit", "submit", "collect 1", "submit", "collect 2"]

    # A completed step, then the failure in the next step's first round.
    t._engine_failure, dead, calls[:] = None, {2}, []
    t.data, t.stream = PromptIterator(t.data.items, batch_size=3, shuffle=False), None
    t.stream = RolloutStream(1, t.data, start_index=7)
    rewards = iter([m + m + m])
    t.collect(Timer())
    t.stream.commit()
    assert calls == ["submit", "submit", "collect 1"]
    with pytest.raises(RolloutFailed):
        t.collect(Timer())
    assert calls[3:] == ["submit", "collect 2"]  # batch 8 (ticket 2): the replica died
    assert t.stream.position() == (8, {**start, "offset": 3})


def test_background_sync_collects_first_submits_after_the_update_and_owns_the_engine(
    monkeypatch,
):
    """The end of an updated step under trainer.background_sync (a stand-in engine and
    gather, no processes): rank 0 collects the next step's batch first, the new batch is
    drawn on the trainer's thread (every rank draws) but submitted only after the engine
    loaded the new version, from the sync's thread; until the sync is joined the trainer
    calls the engine no more (its next call waits for the join); the next step takes the
    collected batch without asking the engine. A failure of the engine inside the sync becomes
    the trainer's at the join (the gather still runs to its end: the other ranks' collectives
    match); an error of the gather itself is raised at the join."""
    import threading

    from megatron_agpo import models
    from megatron_agpo.rollout.types import RolloutError
    from megatron_agpo.trainer.loop import Timer
    from tests.test_trainer_features import _stub_trainer

    t = _stub_trainer(["trainer.max_staleness=1", "trainer.steps=10"], [])
    t.version, t._engine_failure, t._stream_dropped = 3, None, 0
    t.model = t.mcfg = t._gather_groups = None
    calls, gathered, loaded = [], [], []
    gate, entered = threading.Event(), threading.Event()
    here = lambda: threading.current_thread().name  # noqa: E731

    def gather(model, mcfg, groups):
        for i in range(3):
            gathered.append(here())
            yield f"w{i}", torch.full((2,), float(i))

    def collect(ticket):
        calls.append(("collect", ticket, here()))
        return RolloutBatch.from_samples(
            [Sample(p, j, (p,), (p, j), "", (-1.0, -1.0), "stop", False, 3)
             for p in range(3) for j in range(4)], allow_mixed=True)  # fmt: skip

    def submit(reqs, partial):
        calls.append(("submit", reqs[0].seed, here()))
        return len(calls)

    def update_weights(weights, version):
        calls.append(("update", version, here()))
        it = iter(weights)
        loaded[:] = [next(it)[0]]
        entered.set()
        if not gate.wait(10):  # one tensor in: the rest of the gather is the caller's to run
            raise RolloutError("replica 0 (pid 7) exited with code -9 during weight sync; "
                               "log tail:\nvLLM said this")  # fmt: skip
        loaded.extend(n for n, _ in it)

    monkeypatch.setattr(models, "gather_hf_tensors_to_rank0", gather)
    _stream_of_stubs(t, submit, collect)
    t.engine.update_weights = update_weights
    t.stream.top_up(t._submit, 3, most=8)  # batches 7 and 8 in flight
    t.stream.pop(), t.stream.commit()  # step 3 trained batch 7
    t.step = 3
    del calls[:]
    t._prefetch_next_batch()
    t._start_background_sync(4)
    assert entered.wait(10)  # the sync's thread is inside the engine's update
    main, sync = threading.current_thread().name, "agpo-weight-sync"
    assert calls == [("collect", 2, main), ("update", 4, sync)] and loaded == ["w0"]
    nxt = t.stream.pending[-1]  # drawn here, at the new version, not submitted yet
    assert (nxt.index, nxt.version, nxt.ticket) == (9, 4, None) and t.version == 4
    assert t.data.state_dict()["offset"] == 9
    threading.Timer(0.3, gate.set).start()
    t._engine_call(lambda: calls.append(("main", here())))  # waits for the sync
    seed = calls[2][1]
    assert calls[2:] == [("submit", seed, sync), ("main", main)] and nxt.ticket == 3
    assert loaded == ["w0", "w1", "w2"] and gathered == [sync] * 3
    from megatron_agpo.trainer.loop import sampling_seed

    assert seed == sampling_seed(t.cfg.trainer.seed, 9, 0)  # keyed by its stream position
    assert t._sync_background_s >= 0.3 and t._sync_exposed_s > 0.05  # the gate's 0.3 s
    prompts, samples = t._stream_next(Timer())  # step 4: batch 8, collected before the sync
    assert len(calls) == 4 and len(samples.samples) == 12 and t.stream.head().index == 8
    assert [p.prompt_ids for p in prompts] == [(8,), (9,), (10,)]  # batch 8: prompts 3-5

    # The engine fails inside the sync: the trainer learns it at the join, not before.
    gate.clear()
    del gathered[:]
    t.stream.pop(), t.stream.commit()
    t.step = 4
    t._prefetch_next_batch()
    monkeypatch.setattr(gate, "wait", lambda timeout: False)
    t._start_background_sync(5)
    t._bg._thread.join()
    assert t._engine_failure is None and len(gathered) == 3  # drained after the failure
    t._join_sync()
    assert t._engine_failure == "replica 0 (pid 7) exited with code -9 during weight sync"
    assert t.stream.pending[-1].ticket is None  # nothing submitted after the failure

    def broken(model, mcfg, groups):
        yield "w0", torch.zeros(1)
        raise RuntimeError("gloo: connection reset by peer")

    monkeypatch.setattr(models, "gather_hf_tensors_to_rank0", broken)
    t.stream.pop(), t.stream.commit()
    t.step = 5
    t._start_background_sync(6)
    with pytest.raises(RuntimeError, match="connection reset"):
        t._join_sync()


class _FakeEngine:
    """vLLM's LLMEngine as `run_generate_resumable` drives it: one token per live request per
    step (token = prompt length + position, log-prob -(version + 1) / 10), CUMULATIVE
    outputs, internal ids with a suffix, abort by internal id."""

    def __init__(self):
        self.version, self.live, self.added, self.aborted = 0, {}, [], []

    def add_request(self, rid, prompt, params):
        internal = f"{rid}-x"
        self.live[internal] = {"rid": rid, "prompt": list(prompt["prompt_token_ids"]),
                               "max": params.max_tokens, "toks": [], "lps": []}  # fmt: skip
        self.added.append((rid, list(prompt["prompt_token_ids"]), params.max_tokens,
                           params.seed))  # fmt: skip
        return internal

    def has_unfinished_requests(self):
        return bool(self.live)

    def abort_request(self, ids, internal=False):
        assert internal
        self.aborted += ids
        for i in ids:
            del self.live[i]

    def step(self):
        import types

        outs = []
        for key, r in list(self.live.items()):
            tok = len(r["prompt"]) + len(r["toks"])
            r["toks"].append(tok)
            r["lps"].append({tok: types.SimpleNamespace(logprob=-(self.version + 1) / 10)})
            done = len(r["toks"]) == r["max"]
            comp = types.SimpleNamespace(token_ids=list(r["toks"]), logprobs=list(r["lps"]),
                                         finish_reason="length" if done else None)  # fmt: skip
            outs.append(types.SimpleNamespace(request_id=r["rid"], outputs=[comp],
                                              finished=done))  # fmt: skip
            if done:
                del self.live[key]
        return outs


def test_resumable_generation_keeps_each_tokens_version_and_logprob():
    """The bookkeeping of rollout.partial=resume without vLLM: a sync after the third step
    aborts the unfinished requests (by vLLM's internal id) and adds them again with their
    partial response appended to the prompt, the remaining budget and a new seed; every token
    keeps the version and log-prob of the weights that sampled it."""
    import types

    from megatron_agpo.rollout import vllm_engine

    eng = _FakeEngine()
    llm = types.SimpleNamespace(
        llm_engine=eng,
        model_config=types.SimpleNamespace(enforce_eager=True),
        get_tokenizer=lambda: types.SimpleNamespace(decode=lambda t, **k: ",".join(map(str, t))),
    )
    steps = {"n": 0}

    def between():
        steps["n"] += 1
        if steps["n"] == 3:
            eng.version = 1
            return True
        return False

    reqs = [RolloutRequest([1, 2], n=2, max_new_tokens=6, seed=11),
            RolloutRequest([3], n=1, max_new_tokens=2, seed=12)]  # fmt: skip
    samples = vllm_engine.run_generate_resumable(llm, reqs, [4, 5], lambda: eng.version,
                                                 between)  # fmt: skip
    assert [(s.prompt_id, s.sample_index) for s in samples] == [(4, 0), (4, 1), (5, 0)]
    for s in samples[:2]:  # interrupted after 3 tokens, resumed for 3 more under version 1
        assert s.response_token_ids == (2, 3, 4, 5, 6, 7)
        assert s.token_versions == (0, 0, 0, 1, 1, 1) and s.weight_version == 0
        assert s.logprobs == pytest.approx((-0.1,) * 3 + (-0.2,) * 3)
        assert s.truncated and s.finish_reason == "length" and s.text == "2,3,4,5,6,7"
    # Finished at step 2, before the sync: one version, no per-token list.
    assert samples[2].response_token_ids == (1, 2) and samples[2].token_versions == ()
    assert sorted(eng.aborted) == ["agpo-resumable-0-x", "agpo-resumable-1-x"]
    resumed = eng.added[3:]
    assert [(p, m) for _, p, m, _ in resumed] == [([1, 2, 2, 3, 4], 3)] * 2
    assert [seed for *_, seed in resumed] == [vllm_engine.resumed_seed(11, k, 1) for k in (0, 1)]
    assert len({seed for *_, seed in eng.added}) == 5  # every piece its own seed
