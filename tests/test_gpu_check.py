"""scripts/gpu_check.sh without a GPU: the dry run (every GPU step skipped, with its reason)
and the report it writes from real step outputs (benchmarks run small on the CPU, a real
pytest JUnit file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["env", "install", "tests", "fused_loss", "train_step", "sync"]


def _run(*args, env=None, timeout=300):
    cmd = ["bash", str(SCRIPT), *map(str, args)]
    env = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.e2e
def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.e2e
def test_dry_run_skips_every_gpu_step_and_writes_the_report(tmp_path):
    (tmp_path / "train_step.json").write_text('{"stale": true}')  # from an "earlier run"
    res = _run(tmp_path, env={"GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["dry_run"] is True and report["ok"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    env_step, *gpu_steps = report["steps"]
    assert env_step["status"] == "ran"
    for s in gpu_steps:
        assert s["status"] == "skipped" and "dry run" in s["reason"], s
    assert report["env"]["python"] == sys.version.split()[0]
    assert report["env"]["torch"]
    assert report["numbers"]["train_step"] is None  # the stale file was not taken as a result
    md = (tmp_path / "gpu_report.md").read_text()
    assert "(dry run)" in md
    assert "| train_step | skipped | 0 | dry run (GPU_CHECK_DRY_RUN=1) |" in md
    assert md.rstrip().endswith("Result: ok")


@pytest.mark.e2e
def test_without_cuda_each_gpu_step_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = _run(tmp_path, env={"PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    for s in report["steps"][1:]:
        assert s["status"] == "skipped" and s["reason"] == "no CUDA device visible to torch", s


def _junit(tmp_path: Path) -> Path:
    """A real pytest JUnit file with one pass, one skip (with reason) and one failure."""
    t = tmp_path / "t"
    t.mkdir()
    (t / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "@pytest.mark.skip(reason='vLLM is not installed')\n"
        "def test_skip():\n    pass\n"
        "def test_bad():\n    assert 1 == 2\n"
    )
    xml = tmp_path / "out" / "gpu_tests.xml"
    xml.parent.mkdir()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(t),
                    f"--junitxml={xml}", "-o", "junit_family=xunit2"],
                   cwd=t, capture_output=True, timeout=120)  # fmt: skip
    return xml


@pytest.mark.e2e
@pytest.mark.slow
def test_report_from_real_step_outputs(tmp_path):
    """The report reads what the benchmarks and pytest really write (run small on CPU)."""
    out = _junit(tmp_path).parent
    py = sys.executable
    subprocess.run([py, "benchmarks/train_step.py", "--device", "cpu", "--batch", "1", "--seq",
                    "16", "--iters", "1", "--no-hf", "--json", out / "train_step.json"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)  # fmt: skip
    subprocess.run([py, "benchmarks/fused_loss.py", "--device", "cpu", "--tp", "1", "--tokens",
                    "64", "--vocab", "512", "--hidden", "32", "--repeats", "1", "--methods",
                    "naive", "megatron_ce", "fused", "--json", out / "fused_loss.json"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)  # fmt: skip
    (out / "env.json").write_text(json.dumps({"python": "3.12.0", "gpu": "NVIDIA H200"}))
    (out / "steps.tsv").write_text(
        "env\tran\t1\t\ntests\tfailed\t9\texit 1: 1 failed\ntrain_step\tran\t5\t\n"
        "fused_loss\tran\t7\t\nsync\tskipped\t0\tvLLM is not installed\n"
    )
    res = _run("--report-only", out, env={"PYTHON": py})
    assert res.returncode == 1, res.stdout + res.stderr  # a step failed
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["ok"] is False
    tests = report["tests"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    (skip,) = [c for c in tests["cases"] if c["status"] == "skipped"]
    assert "vLLM is not installed" in skip["reason"]
    ts = report["numbers"]["train_step"]
    assert ts["device"] == "cpu" and ts["megatron_tokens_per_s"] > 0 and ts["mfu"] is None
    fl = report["numbers"]["fused_loss"]
    assert {r["method"] for r in fl["rows"]} == {"naive", "megatron_ce", "fused"}
    md = (out / "gpu_report.md").read_text()
    assert "Train step, SmolLM2-135M float32" in md and "MFU n/a" in md
    assert "| 1 | fused |" in md and "Ratios: TP=1 fp32 fused:" in md
    assert "| sync | skipped | 0 | vLLM is not installed |" in md
    assert "Result: FAILED: tests" in md
