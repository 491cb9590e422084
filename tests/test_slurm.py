"""The SLURM job scripts (slurm/): their dry run, and under a real scheduler (the one-node
cluster of scripts/slurm_local.sh) the controller's check of the 70B job, the tiny job run to
completion with its replica as its own job step, and preemption: USR1 -> checkpoint ->
requeue -> resume with every step counted once.

The `slurm` tests skip when no local cluster answers; .ci/run starts one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = Path(os.environ.get("AGPO_SLURM_DIR", "/tmp/agpo-slurm"))
# Short runs of the tiny job: a 30-step warm start (cached after the first run), no eval.
TINY = ("model.warmstart_steps=30", "trainer.eval_every=0", "data.prompts_per_step=8")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without a surrounding job's SLURM_* variables (SLURM_CONF kept)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if "SLURM_CONF" in os.environ:
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    elif (SLURM_DIR / "etc" / "slurm.conf").exists():
        env["SLURM_CONF"] = str(SLURM_DIR / "etc" / "slurm.conf")
    env.update(OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1", **extra)
    return env


def _run(cmd: list[str], cwd: Path | None = None, timeout: int = 60, **env: str):
    return subprocess.run(
        cmd, env=_clean_env(**env), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "slurm" / script), "--dry-run", *args],
        env=_clean_env(**{"AGPO_PLAN_CHECK": "0", **env}),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def _srun_lines(out: str) -> list[list[str]]:
    lines = [x.strip() for x in out.splitlines() if x.strip().startswith("srun ")]
    return [x.split() for x in lines]


def _opt(cmd: list[str], name: str) -> str:
    hits = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    assert len(hits) == 1, (name, cmd)
    return hits[0]


def _overrides(cmd: list[str]) -> dict[str, str]:
    """key -> value of the Hydra overrides after `-m megatron_agpo.train` (last one wins, as in
    Hydra)."""
    i = cmd.index("megatron_agpo.train")
    return dict(a.split("=", 1) for a in cmd[i + 1 :])


# ----------------------------------------------------------------------------- dry runs
@pytest.mark.e2e
def test_70b_dry_run_layout():
    res = _dry_run("agpo_70b.sh", "trainer.steps=7", "parallel.pipeline_parallel=4")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    steps = _srun_lines(out)
    train, replicas = steps[0], steps[1:]
    # 12 nodes: the first 8 train (8 ranks each), the last 4 run one TP8 replica each.
    assert _opt(train, "nodes") == "8" and _opt(train, "ntasks") == "64"
    assert _opt(train, "nodelist") == ",".join(f"node{i}" for i in range(1, 9))
    assert "TP=4 PP=4 DP=4" in out  # 64 / (4 x 4)
    ov = _overrides(train)
    assert ov["model"] == "llama3_70b"
    assert (ov["parallel.tensor_parallel"], ov["parallel.pipeline_parallel"]) == ("4", "4")
    # The cluster is the planner's section: the plan check gets it, the trainer does not.
    assert ov["nproc"] == "64" and not [k for k in ov if k.startswith("cluster")]
    assert "plan cluster:   cluster.nodes=8 cluster.gpus_per_node=8 (agpo-plan only)" in out
    assert ov["rollout.engine.launch"] == "external"
    assert ov["rollout.engine.num_replicas"] == "4"
    assert ov["rollout.engine.tensor_parallel_size"] == "8"
    assert ov["trainer.steps"] == "7"  # the command line comes last
    secret = ov["rollout.engine.secret_file"]
    assert len(replicas) == 4
    for i, r in enumerate(replicas):
        assert _opt(r, "nodelist") == f"node{9 + i}"
        assert _opt(r, "gres") == "gpu:8"
        assert r[r.index("--replica-index") + 1] == str(i)
        assert r[r.index("--secret-file") + 1] == secret
    # Each NCCL/CUDA default is there and the environment overrides it.
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in out and "NCCL_CUMEM_ENABLE=1" in out
    res = _dry_run("agpo_70b.sh", NCCL_CUMEM_ENABLE="0", NCCL_IB_TIMEOUT="22")
    assert "NCCL_CUMEM_ENABLE=0" in res.stdout and "NCCL_IB_TIMEOUT=22" in res.stdout


@pytest.mark.e2e
def test_70b_dry_run_other_layouts_and_errors():
    # Two rollout nodes with TP4 replicas: two replicas per node; 10 training nodes.
    res = _dry_run("agpo_70b.sh", ROLLOUT_NODES="2", ROLLOUT_TP="4")
    assert res.returncode == 0, res.stderr
    train, *replicas = _srun_lines(res.stdout)
    assert _opt(train, "ntasks") == "80" and "TP=4 PP=4 DP=5" in res.stdout
    assert [_opt(r, "nodelist") for r in replicas] == ["node11", "node11", "node12", "node12"]
    assert all(_opt(r, "gres") == "gpu:4" for r in replicas)
    # The trainer starts its own replica when no node is set aside for rollouts.
    res = _dry_run("agpo_70b.sh", "rollout=colocated", ROLLOUT_NODES="0")
    train, *replicas = _srun_lines(res.stdout)
    assert not replicas and "rollout.engine.launch=external" not in res.stdout
    assert _opt(train, "ntasks") == "96"
    # Bad layouts: one line naming the variables, exit 2, no traceback.
    for env, msg in (
        ({"AGPO_TP": "3"}, "64 training ranks (8 nodes x 8) do not divide into TP=3 x PP=4"),
        ({"ROLLOUT_NODES": "13"}, "ROLLOUT_NODES=13 do not fit the 12 node(s)"),
        ({"NUM_REPLICAS": "5"}, "NUM_REPLICAS=5 replicas of ROLLOUT_TP=8 GPUs do not fit"),
        ({"TRAIN_NODES": "eight"}, "TRAIN_NODES=eight is not a whole number"),
    ):
        res = _dry_run("agpo_70b.sh", **env)
        assert res.returncode == 2 and msg in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    res = _dry_run("agpo_70b.sh", "--bogus")
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr


@pytest.mark.e2e
def test_tiny_dry_run():
    res = _dry_run("agpo_tiny.sh", "trainer.steps=2")
    assert res.returncode == 0, res.stderr
    train, replica = _srun_lines(res.stdout)
    assert _opt(train, "ntasks") == "2"
    assert "--overlap" in replica  # on the training node, beside the two ranks
    assert "--gres" not in " ".join(train + replica)  # CPU: no GPU request
    assert "NCCL" not in res.stdout


@pytest.mark.e2e
def test_70b_plan_check():
    if not (REPO / "megatron_agpo" / "plan" / "__main__.py").exists():
        pytest.skip("megatron_agpo.plan is not here")
    # TP2 PP1: half of the 70B model (35B parameters, about 200 GiB with Adam) per GPU.
    res = _dry_run("agpo_70b.sh", AGPO_TP="2", AGPO_PP="1", AGPO_PLAN_CHECK="1")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "agpo-plan: DOES NOT FIT" in res.stdout
    assert "the plan check failed" in res.stderr
    # The job as shipped passes it: a user's first `sbatch slurm/agpo_70b.sh` is not refused.
    res = _dry_run("agpo_70b.sh", AGPO_PLAN_CHECK="1")
    assert res.returncode == 0 and "agpo-plan: FITS" in res.stdout, res.stdout + res.stderr


# ----------------------------------------------------------------------------- real SLURM
def _cluster_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    # Without a configuration file sinfo retries for a minute before it gives up.
    if not Path(_clean_env().get("SLURM_CONF", "/etc/slurm/slurm.conf")).exists():
        return False
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-n", "localhost", "-o", "%T"],
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and res.stdout.strip() in ("idle", "mixed", "allocated")


slurm = pytest.mark.skipif(
    not _cluster_up(), reason="no local SLURM cluster (scripts/slurm_local.sh start)"
)


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.mark.e2e
@pytest.mark.slurm
@slurm
def test_70b_job_accepted_by_the_controller(tmp_path):
    env = _clean_env()
    script = str(REPO / "slurm" / "agpo_70b.sh")

    def test_only(*opts: str) -> str:
        res = _run(["sbatch", "--test-only", "-p", "gpu", *opts, script], cwd=tmp_path)
        return res.stdout + res.stderr

    assert re.search(r"to start at \S+ using \d+ processors on nodes gpu\[1-12\]", test_only())
    # The controller really checks: 17 nodes or 9 GPUs per node do not exist here.
    for bad in ("--nodes=17", "--gpus-per-node=9"):
        assert "Requested node configuration is not available" in test_only(bad), bad
    # The directives as the controller recorded them (a held job, cancelled right away).
    res = _run(["sbatch", "--hold", "--parsable", "-p", "gpu", script], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    try:
        job = _job(job_id)
    finally:
        subprocess.run(["scancel", job_id], env=env, timeout=30)
    assert job["NumNodes"] in ("12", "12-12") and job["NumTasks"] == "96" and job["Requeue"] == "1"
    assert job["TimeLimit"] == "04:00:00" and job["OverSubscribe"] == "NO"  # --exclusive
    assert job["TresPerNode"] == "gres:gpu:8" and job["NumCPUs"] == "768"  # 96 x 8
    assert job["StdOut"] == str(tmp_path / f"agpo-70b-{job_id}.out")


def _sbatch(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Submit slurm/agpo_tiny.sh (TINY, then `args`) and return at once (--parsable)."""
    cmd = ["sbatch", "--parsable", str(REPO / "slurm" / "agpo_tiny.sh"), *TINY, *args]
    return _run(cmd, cwd=tmp_path, timeout=900, RUN_DIR=str(tmp_path / "run"), **env)


FINAL_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
)
"""Job states slurm does not leave (squeue(1), JOB STATE CODES)."""


def _preempt(tmp_path: Path, job_id: str, started, between=lambda: None) -> dict[str, str]:
    """Once `started()`, USR1 to the batch shell (what --signal=B:USR1 does before the time
    limit); wait for the job to requeue itself, call `between()`, and wait until it ends.
    The job's record at the end."""
    deadline = time.time() + 600
    try:
        while not started():
            assert time.time() < deadline, "the job did not get going in 10 minutes"
            state = _job(job_id).get("JobState")
            assert state in ("PENDING", "RUNNING"), (state, _batch_log(tmp_path, job_id))
            time.sleep(0.5)
        _run(["scancel", "--signal=USR1", "--batch", job_id]).check_returncode()
        while (job := _job(job_id)).get("Restarts", "0") == "0":
            assert time.time() < deadline, (job, _batch_log(tmp_path, job_id))
            time.sleep(0.5)
        between()
        # The requeued job starts again by itself (after cred_expire, 10 s on the test
        # cluster: scripts/slurm_local.sh).
        # Until a final state: COMPLETING (the first start's clean-up, before REQUEUED) lasts
        # long enough on a loaded machine for a poll to see it.
        while _job(job_id).get("JobState") not in FINAL_STATES:
            assert time.time() < deadline + 300, _batch_log(tmp_path, job_id)
            time.sleep(1)
    finally:
        _run(["scancel", job_id])
    return _job(job_id)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _batch_log(tmp_path: Path, job_id: str) -> str:
    return (tmp_path / f"agpo-tiny-{job_id}.out").read_text()


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slurm
@pytest.mark.slow
@slurm
def test_usr1_saves_requeues_and_resumes_every_step_once(tmp_path):
    """slurm/agpo_tiny.sh under the controller: the trainer and a vLLM replica (its own job
    step) run, USR1 to the batch shell saves and requeues, the second start resumes; every
    step once, each sampled with the weights just synced."""
    steps = 6
    res = _sbatch(tmp_path, f"trainer.steps={steps}")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    first: list[str] = []
    job = _preempt(
        tmp_path,
        job_id,
        started=lambda: metrics.exists() and bool(metrics.read_text().strip()),
        # The first start's rows, read before the second start begins.
        between=lambda: first.append(metrics.read_text()),
    )
    log = _batch_log(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert job["Restarts"] == "1", log
    assert "training step ended with exit code 75" in log and "requeueing job" in log
    # The first start saved at step k and the second resumed there.
    train0 = (run / "logs" / f"{job_id}-0" / "train-0.log").read_text()
    train1 = (run / "logs" / f"{job_id}-1" / "train-0.log").read_text()
    saved = re.search(r"preempted \(SIGUSR1\): saved \S+ at step (\d+); exit 75", train0)
    resumed = re.search(r"resumed from \S+ at step (\d+)", train1)
    assert saved and resumed, train0[-2000:] + train1[-2000:]
    k = int(saved.group(1))
    assert int(resumed.group(1)) == k and 1 <= k < steps
    # Every step once: the final metrics hold steps 1..6 once each, and the first start's rows
    # are there unchanged (a step run again would have rewritten its row's timings).
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["weight_version"] for r in rows] == list(range(1, steps + 1))
    assert metrics.read_text().startswith(first[0]) and len(first[0].splitlines()) == k
    # The replica, its own job step, sampled with the weights just synced to it: its log-probs
    # equal the trainer's (fp32) after every sync, in both starts.
    assert all(r["logp_gap"] < 1e-4 for r in rows), rows
    for start in (0, 1):
        logs = run / "logs" / f"{job_id}-{start}"
        names = sorted(p.name for p in logs.iterdir())
        assert names == ["replica-0.log", "train-0.log", "train-1.log"], names
    assert "srun --job-name=replica0" in log and "--replica-index 0" in log
    assert not any((run / "replica_logs").glob("*"))  # nothing spawned by the trainer
    assert (run / "rollout_secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.e2e
@pytest.mark.slurm
@slurm
def test_usr1_reaches_the_ranks_only_and_the_job_requeues(tmp_path):
    """The batch shell's side alone, with a stand-in trainer (tests/slurm_standin.py: seconds
    per run, no torch): USR1 -> the ranks (not their worker processes) -> exit 75 -> requeue
    -> resume; every step of every rank once."""
    steps, run = 12, tmp_path / "run"
    standin = str(REPO / "tests" / "slurm_standin.py")
    res = _sbatch(tmp_path, f"trainer.steps={steps}", ROLLOUT_LAUNCH="spawn",
                  PYTHON=standin, STANDIN_STEP_S="0.5")  # fmt: skip
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    rank0 = run / "rank0.steps"
    job = _preempt(tmp_path, job_id, started=lambda: rank0.exists() and rank0.read_text())
    log = _batch_log(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert job["Restarts"] == "1", log
    assert "training step ended with exit code 75" in log and "requeueing job" in log
    assert "SIGUSR1 to ranks" in log  # the ranks alone, found by scontrol listpids
    for rank in (0, 1):
        lines = [x.split() for x in (run / f"rank{rank}.steps").read_text().splitlines()]
        assert [int(s) for s, _ in lines] == list(range(1, steps + 1)), (rank, lines)
        restarts = [r for _, r in lines]
        k = restarts.count("0")
        # Stopped early in the first start, then all the rest in the second.
        assert 1 <= k < steps and restarts == ["0"] * k + ["1"] * (steps - k), lines
