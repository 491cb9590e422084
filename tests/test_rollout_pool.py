"""`ReplicaPool` over replica processes whose vLLM engine is replaced by a stand-in (no vLLM):
the real worker (hello, configure, heartbeat thread, serve loop, bucket decoding) and the real
pool, in seconds. What the stand-in engine computes is a closed form the tests check:
a weight sync reports the float64 sum of every tensor it received (through
`prompt_logprobs`), a generation answers each prompt reversed, after an optional delay.
The same paths on real vLLM: tests/test_rollout.py and tests/test_rollout_external.py.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq

from megatron_agpo.rollout import RolloutConfig, RolloutRequest, RolloutTimeoutError, wire
from megatron_agpo.rollout.replicas import ReplicaPool

ROOT = Path(__file__).resolve().parents[1]

# A replica process: the real worker module with `build_llm` / `run_generate` /
# `reload_weights` / `run_prompt_logprobs` replaced by the stand-in described above.
FAKE_REPLICA = r"""
import sys, time
import torch
from megatron_agpo.rollout import replica_worker, vllm_engine
from megatron_agpo.rollout.types import Sample

DELAY = float(sys.argv.pop())

class Engine:
    checksum = 0.0

def reload_weights(llm, weights):
    llm.checksum = sum(float(t.double().sum()) for _, t in weights)
    return 0.0

def run_generate(llm, requests, prompt_ids, version):
    time.sleep(DELAY)
    out = []
    for pid, r in zip(prompt_ids, requests):
        resp = tuple(reversed(r.prompt_token_ids))
        out.append(Sample(pid, 0, r.prompt_token_ids, resp, "", (-1.0,) * len(resp),
                          "stop", False, version))
    return out

vllm_engine.build_llm = lambda config, seed=None: Engine()
vllm_engine.reload_weights = reload_weights
vllm_engine.run_generate = run_generate
vllm_engine.run_prompt_logprobs = lambda llm, seqs: [[llm.checksum]]
replica_worker.main()
"""


def _start(run_dir: Path, secret: Path, index: int, delay: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, "-c", FAKE_REPLICA, "--connect-file"]
    cmd += [str(run_dir / "rollout_endpoint.json"), "--secret-file", str(secret)]
    cmd += ["--replica-index", str(index), "--wait-s", "120", str(delay)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(run_dir / f"fake_{index}.log", "wb")  # noqa: SIM115 - owned by Popen
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


class _Run:
    """A pool of `n` stand-in replicas started by hand (launch="external")."""

    def __init__(self, tmp_path: Path, n: int = 2, delays=(), **cfg):
        self.dir = tmp_path
        self.secret = tmp_path / "secret"
        wire.write_secret(self.secret)
        self.procs = [_start(tmp_path, self.secret, i, dict(delays).get(i, 0.0)) for i in range(n)]
        config = RolloutConfig(
            model_path="unused",
            num_replicas=n,
            launch="external",
            secret_file=str(self.secret),
            heartbeat_s=0.2,
            heartbeat_timeout_s=30.0,
            connect_timeout_s=120.0,
            start_timeout_s=60.0,
            request_timeout_s=60.0,
            sync_timeout_s=60.0,
            **cfg,
        )
        try:
            self.pool = ReplicaPool(config, log_dir=tmp_path / "replica_logs")
        except BaseException:
            self.close()
            raise

    def close(self):
        if hasattr(self, "pool"):
            self.pool.close()
        for p in self.procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()


@pytest.fixture
def run(tmp_path):
    r = _Run(tmp_path)
    yield r
    r.close()


def _weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        ("a", torch.randn(300, 200, generator=gen)),
        ("b", torch.randn(7, generator=gen).to(torch.bfloat16)),
        ("c", torch.randint(0, 100, (50,), generator=gen)),
        ("d", torch.randn(90_000, generator=gen)),
    ]


def _reference_sum(weights) -> float:
    return sum(float(t.double().sum()) for _, t in weights)


@pytest.mark.dist
def test_pool_serves_through_the_real_worker(run):
    """Prompts split over two replicas come back in order; a weight sync in several buckets
    delivers every byte (the replicas' float64 sums equal ours); the endpoint file names
    the pool; close() stops the external replicas (exit 0) and removes the file."""
    pool = run.pool
    assert json.loads((run.dir / "rollout_endpoint.json").read_text())["port"] == pool.port
    reqs = [RolloutRequest([i, i + 1, i + 2]) for i in range(5)]
    batch = pool.generate(reqs, expected_version=0)
    assert [s.response_token_ids for s in batch.samples] == [(i + 2, i + 1, i) for i in range(5)]
    pool.config.bucket_mb = 0.2  # 240 kB + 360 kB tensors: one bucket each at least
    weights = _weights()
    report = pool.update_weights(iter(weights), 1)
    assert report.num_buckets >= 3 and pool.weight_versions == [1, 1]
    sums = [lp[0][0] for lp in pool.prompt_logprobs([[1, 2]])]
    assert sums == [pytest.approx(_reference_sum(weights), rel=1e-12)] * 2
    pool.close()
    assert [p.wait(timeout=30) for p in run.procs] == [0, 0]
    assert not (run.dir / "rollout_endpoint.json").exists()


@pytest.mark.dist
def test_hostile_peers_beside_a_working_pool(run, tmp_path):
    """A crafted pickle over plain TCP, ZMQ without CURVE, and a CURVE impostor posing as
    replica 0: refused, logged, given nothing while the pool syncs and generates; the marker
    the pickle would create never appears; replica 0 is still the real one."""
    marker = tmp_path / "unpickled"

    class Touch:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = pickle.dumps(Touch())
    pool = run.pool
    raw = socket.create_connection((pool.host, pool.port))
    raw.sendall(crafted * 4)
    ctx = zmq.Context()
    plain, impostor = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    pub, sec = zmq.curve_keypair()
    impostor.curve_serverkey = pool._keys.server_public
    impostor.curve_publickey, impostor.curve_secretkey = pub, sec
    for s in (plain, impostor):
        s.linger = 0
        s.connect(pool.endpoint)
        s.send_multipart([crafted])
        s.send_multipart(wire.encode({"op": "hello", "replica": 0, "pid": 1, "host": "evil"}))
    try:
        weights = _weights(1)
        pool.update_weights(iter(weights), 1)
        batch = pool.generate([RolloutRequest([4, 5, 6])], expected_version=1)
        assert batch.samples[0].response_token_ids == (6, 5, 4)
        sums = [lp[0][0] for lp in pool.prompt_logprobs([[1, 2]])]
        assert sums == [pytest.approx(_reference_sum(weights), rel=1e-12)] * 2
        assert plain.poll(300) == 0 and impostor.poll(300) == 0
        raw.settimeout(0.5)
        got = b""
        try:
            while chunk := raw.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionError):
            pass
        assert len(got) <= 64
    finally:
        raw.close()
        ctx.destroy(linger=0)
    assert not marker.exists()
    assert pool.replica_info[0]["pid"] == run.procs[0].pid
    refused = pool.refused
    assert any("not this run's secret" in r for r in refused)
    assert sum("not a ZMQ CURVE peer" in r for r in refused) >= 2


@pytest.mark.dist
def test_stopped_replica_reported_within_heartbeat_timeout(run):
    """SIGSTOP one replica: the call fails after heartbeat_timeout_s (2 s), not after
    request_timeout_s (60 s)."""
    pool = run.pool
    pool.config.heartbeat_timeout_s = 2.0
    run.procs[1].send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(RolloutTimeoutError, match=r"replica 1 .*no heartbeat .*=2\)"):
        pool.generate([RolloutRequest([1, 2])] * 4)
    elapsed = time.monotonic() - t0
    print(f"\nstopped replica reported after {elapsed:.1f} s (heartbeat timeout 2 s)")
    assert 2.0 <= elapsed < 3.5


@pytest.mark.dist
def test_slow_replica_not_reported(tmp_path):
    """A replica whose generation takes 4 s, with heartbeat_timeout_s=1: answered, since its
    heartbeat thread keeps it alive."""
    run = _Run(tmp_path, n=1, delays={0: 4.0})
    try:
        run.pool.config.heartbeat_timeout_s = 1.0
        t0 = time.monotonic()
        batch = run.pool.generate([RolloutRequest([1, 2, 3])])
        assert batch.samples[0].response_token_ids == (3, 2, 1)
        assert time.monotonic() - t0 >= 4.0
    finally:
        run.close()


@pytest.mark.dist
def test_collective_channel_authenticated_bytes(tmp_path):
    """The collective (gloo) channel between the pool and two stand-in replicas: every byte
    arrives (float64 sums), with each bucket's HMAC checked on the replica."""
    run = _Run(tmp_path, sync_channel="collective", bucket_mb=0.2)
    try:
        weights = _weights(2)
        report = run.pool.update_weights(iter(weights), 1)
        assert report.num_buckets >= 3
        sums = [lp[0][0] for lp in run.pool.prompt_logprobs([[1, 2]])]
        assert sums == [pytest.approx(_reference_sum(weights), rel=1e-12)] * 2
    finally:
        run.close()
