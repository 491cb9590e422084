"""Replicas started separately from the trainer (`launch="external"`, how SLURM job steps on
rollout nodes run them), and replicas never outliving their trainer. Real vLLM (tiny random
Llama, fp32, CPU); each test starts its own replica processes.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from megatron_agpo.rollout import RolloutConfig, RolloutRequest, sync_and_verify, wire  # noqa: E402
from megatron_agpo.rollout.replica_worker import EXIT_TRAINER_GONE  # noqa: E402
from tests import rollout_utils as tu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
ENV = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")

# A trainer in a process of its own (so the tests can kill it): builds the pool from the
# RolloutConfig given as JSON, prints the replicas' pids once they serve, then idles.
TRAINER = """
import json, sys, time
from megatron_agpo.rollout import RolloutConfig
from megatron_agpo.rollout.replicas import ReplicaPool
pool = ReplicaPool(RolloutConfig(**json.loads(sys.argv[1])), log_dir=sys.argv[2])
print(json.dumps([p.pid if p else i["pid"] for p, i in zip(pool.processes, pool.replica_info)]),
      flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tu.make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _config(tiny_dir, **kw) -> RolloutConfig:
    return RolloutConfig(
        model_path=str(tiny_dir),
        dtype="float32",
        max_model_len=512,
        cpu_kvcache_space_gib=1,
        start_timeout_s=300,
        request_timeout_s=120,
        sync_timeout_s=120,
        connect_timeout_s=300,
        **kw,
    )


def _start_replica(run_dir: Path, secret: Path, index: int) -> subprocess.Popen:
    """A replica started by hand, as a SLURM step would: it waits for the endpoint file."""
    cmd = [sys.executable, "-m", "megatron_agpo.rollout.replica_worker"]
    cmd += ["--connect-file", str(run_dir / "rollout_endpoint.json")]
    cmd += ["--secret-file", str(secret), "--replica-index", str(index), "--wait-s", "300"]
    log = open(run_dir / f"external_{index}.log", "wb")  # noqa: SIM115 - owned by Popen
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def _log(run_dir: Path, index: int) -> str:
    return (run_dir / f"external_{index}.log").read_text(errors="replace")[-3000:]


def _gone(pid: int) -> bool:
    """Exited (or a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int], limit_s: float) -> float:
    t0 = time.monotonic()
    while not all(_gone(p) for p in pids):
        if time.monotonic() - t0 > limit_s:
            break
        time.sleep(0.1)
    return time.monotonic() - t0


def _start_trainer(cfg: RolloutConfig, log_dir: Path) -> tuple[subprocess.Popen, list[int]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "trainer.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", TRAINER, json.dumps(cfg.to_dict()), str(log_dir)],
            env=ENV,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    line = proc.stdout.readline()  # blocks until the pool serves (or the trainer died)
    if not line:
        tail = (log_dir / "trainer.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"trainer exited with {proc.wait()} before serving:\n{tail}")
    return proc, json.loads(line)


@pytest.mark.engine
@pytest.mark.e2e
def test_external_replica_end_to_end(tiny_dir, tmp_path):
    """A replica started by hand with the run's secret file finds the trainer through the
    endpoint file, gets its engine settings over the channel, serves a weight sync and
    generations with fp32 parity against transformers, and exits 0 on close."""
    from megatron_agpo.rollout.replicas import ReplicaPool

    secret = tmp_path / "secret"
    wire.write_secret(secret)
    replica = _start_replica(tmp_path, secret, 0)  # before the trainer: it waits for the file
    cfg = _config(tiny_dir, launch="external", secret_file=str(secret), heartbeat_s=0.5)
    try:
        pool = ReplicaPool(cfg, log_dir=tmp_path / "replica_logs")
    except BaseException:
        replica.kill()
        print(_log(tmp_path, 0))
        raise
    try:
        endpoint = json.loads((tmp_path / "rollout_endpoint.json").read_text())
        assert endpoint == {"host": "127.0.0.1", "port": pool.port}
        assert pool.replica_info[0]["pid"] == replica.pid and pool.processes == [None]
        hf = tu.load_hf_model(tiny_dir)
        new = copy.deepcopy(hf)
        tu.perturb_(new, scale=0.3, seed=11)
        probes = [[1] + list(range(10, 40)), [1, 5, 6, 7, 8, 9, 10, 11, 12]]
        ref = tu.hf_token_logprobs(new, probes)
        pool.config.bucket_mb = 0.25
        parity = sync_and_verify(pool, tu.hf_named_tensors(new), 1, probes, ref, TOL)
        print(f"\nexternal replica sync parity: max {parity.max_abs_diff:.2e}")
        assert parity.max_abs_diff < TOL and parity.max_change_from_before > 1e-2
        batch = pool.generate(
            [RolloutRequest(probes[1], n=3, max_new_tokens=12, seed=1)], expected_version=1
        )
        seqs = [list(s.prompt_token_ids) + list(s.response_token_ids) for s in batch.samples]
        start = [len(s.prompt_token_ids) for s in batch.samples]
        ref_lps = tu.hf_token_logprobs(new, seqs, start)
        gap = max(
            abs(a - b)
            for s, r in zip(batch.samples, ref_lps, strict=True)
            for a, b in zip(s.logprobs, r, strict=True)
        )
        assert gap < TOL
    finally:
        pool.close()
    assert replica.wait(timeout=60) == 0, _log(tmp_path, 0)
    assert not (tmp_path / "rollout_endpoint.json").exists()


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_spawned_replica_dies_with_its_trainer(tiny_dir, tmp_path):
    """SIGKILL the trainer: the replica it spawned goes at once (PR_SET_PDEATHSIG), no orphan
    keeps its memory (or GPU)."""
    trainer, pids = _start_trainer(_config(tiny_dir), tmp_path / "logs")
    assert not _gone(pids[0])
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=30)
    elapsed = _wait_gone(pids, 30.0)
    print(f"\nspawned replica gone {elapsed:.1f} s after its trainer was killed")
    assert elapsed < 5.0


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_external_replica_exits_when_its_trainer_dies(tiny_dir, tmp_path):
    """SIGKILL the trainer of an external replica: the replica's heartbeat connection drops
    and it exits (code EXIT_TRAINER_GONE) within heartbeat_timeout_s."""
    secret = tmp_path / "secret"
    wire.write_secret(secret)
    replica = _start_replica(tmp_path, secret, 0)
    cfg = _config(
        tiny_dir,
        launch="external",
        secret_file=str(secret),
        heartbeat_s=0.5,
        heartbeat_timeout_s=3.0,
    )
    # The trainer's log_dir is the run dir's replica_logs, so the endpoint file lands in
    # tmp_path where the replica looks for it.
    try:
        trainer, pids = _start_trainer(cfg, tmp_path / "replica_logs")
    except BaseException:
        replica.kill()
        print(_log(tmp_path, 0))
        raise
    assert pids == [replica.pid]
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=30)
    t0 = time.monotonic()
    try:
        rc = replica.wait(timeout=30)
    finally:
        replica.kill()
    elapsed = time.monotonic() - t0
    print(f"\nexternal replica exited {elapsed:.1f} s after its trainer was killed")
    assert rc == EXIT_TRAINER_GONE, _log(tmp_path, 0)
    assert "unreachable" in _log(tmp_path, 0)
    assert 3.0 <= elapsed < 6.0
