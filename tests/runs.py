"""Trainer runs shared between tests: one `agpo-train` subprocess run serves every test that
only reads what it left (metrics, checkpoints, config). The fixtures built on these live in
tests/conftest.py; tests that use one run on one pytest-xdist worker (conftest groups them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SHORT = (
    "model.warmstart_steps=30", "trainer.eval_every=2", "trainer.eval_n=4", "data.num_eval=8",
    "data.prompts_per_step=8", "logging.progress=false", "checkpoint.save_every=2",
)  # fmt: skip
"""A short CPU run (2 ranks, TP=2, a vLLM replica): a 30-step warm start (cached after the
first run), eval every 2 steps, a checkpoint every 2 steps."""

TP2_OPTS = (
    "scheduler.decay_style=cosine", "scheduler.warmup_steps=1", "scheduler.decay_steps=4",
    "trainer.token_budget=300",
)  # fmt: skip
"""The shared TP=2 run's extras: a cosine lr schedule (restored from a checkpoint on resume)
and token-budget micro-batches."""


def train(run_dir: Path, steps: int, *extra: str) -> list[dict]:
    """Run `agpo-train` (SHORT, then `extra`) to completion; its metrics rows."""
    cmd = [
        sys.executable, "-m", "megatron_agpo.train", f"trainer.steps={steps}", *SHORT,
        f"logging.run_dir={run_dir}", *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
