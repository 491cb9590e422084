"""Issue 26, point 6: the replica secret never in a process's environment, the heartbeat
range stated, deeply nested JSON from a peer refused, SLURM variables never evaluated by the
shell, a full disk during a save named, a torn metrics line in the middle named in one line."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_agpo.registry import require_valid
from megatron_agpo.rollout import RolloutConfig, wire

REPO = Path(__file__).resolve().parent.parent

# Stands in for `python -m megatron_agpo.rollout.replica_worker`: reads the secret the real
# way, reports whether it matches, then waits (so its /proc/PID/environ can be read).
SECRET_READER = """
import sys, time
from megatron_agpo.rollout import replica_worker
import argparse
ap = argparse.ArgumentParser()
for a in ("--connect", "--replica-index", "--parent-pid", "--secret-file"):
    ap.add_argument(a)
ap.add_argument("--secret-fd", type=int)
args = ap.parse_args(sys.argv[1:])
print(replica_worker.run_secret(args).hex(), flush=True)
time.sleep(60)
"""


@pytest.mark.dist  # a stand-in replica process
def test_spawned_replica_gets_the_secret_outside_its_environment(tmp_path, monkeypatch):
    from megatron_agpo.rollout import replicas

    real = subprocess.Popen
    started = []

    def popen(cmd, **kw):
        i = cmd.index("megatron_agpo.rollout.replica_worker")
        cmd = [cmd[0], "-c", SECRET_READER, *cmd[i + 1 :]]
        p = real(cmd, cwd=REPO, **kw)
        started.append(p)
        return p

    monkeypatch.setattr(replicas.subprocess, "Popen", popen)
    secret = os.urandom(32)
    fake = SimpleNamespace(
        config=RolloutConfig(model_path="x"), _secret=secret, endpoint="tcp://127.0.0.1:1",
        log_dir=tmp_path, processes=[None],
    )  # fmt: skip
    replicas.ReplicaPool._spawn(fake, 0)
    (proc,) = started
    try:
        t0 = time.time()
        while not (tmp_path / "replica_0.log").read_text().strip():
            assert proc.poll() is None and time.time() - t0 < 60
            time.sleep(0.05)
        assert (tmp_path / "replica_0.log").read_text().split()[0] == secret.hex()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert secret.hex().encode() not in environ and wire.SECRET_ENV.encode() not in environ
        assert secret.hex() not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text())
    finally:
        proc.kill()
        proc.wait()


def test_heartbeat_range_is_stated_and_the_docs_example_accepted():
    assert RolloutConfig(model_path="x", heartbeat_timeout_s=3).heartbeat_s == 0.5
    with pytest.raises(ValueError, match=r"at least 2 x heartbeat_s \(10 s"):
        require_valid(RolloutConfig(model_path="x", heartbeat_s=5, heartbeat_timeout_s=3), "")
    docs = (REPO / "docs" / "ROLLOUT.md").read_text()
    assert "heartbeat_timeout_s=3)" in docs  # the example this checks


def test_deeply_nested_json_from_a_peer_is_refused_not_a_crash():
    deep = b'{"op": "heartbeat", "replica": 0, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(wire.WireError, match="nests too deeply"):
        wire.decode_header(deep)


@pytest.mark.e2e  # bash runs slurm/agpo_tiny.sh --dry-run
@pytest.mark.parametrize("var", ["SLURM_JOB_ID", "SLURM_CPUS_ON_NODE", "SLURM_NNODES"])
def test_slurm_variables_are_never_evaluated_by_the_shell(tmp_path, var):
    marker = tmp_path / "ran"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({var: f"a[$(touch {marker})]", "AGPO_PLAN_CHECK": "0", "ROLLOUT_NODES": "1"})
    res = subprocess.run(
        ["bash", str(REPO / "slurm" / "agpo_tiny.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert not marker.exists(), "a SLURM variable's value ran as a command"
    assert res.returncode == 2 and f"{var}=a[$(touch" in res.stderr, res.stderr
    assert "is not a whole number" in res.stderr
