"""CI smoke of every stage of examples/search_relevance (data, warm start, 2 RL steps per
algorithm, vLLM annotation, students, report) at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_search_relevance_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(ROOT / "examples/search_relevance/run.sh"), "--smoke", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["annotators"]) == {"base", "grpo-s1", "agpo-s1"}
    for a in res["annotators"].values():
        g = a["gold"]
        assert 0.0 <= g["macro_f1"] <= 1.0 and g["pairs"] == 40
        assert a["annotated"] == 60
    # A student per annotator that gave any valid answer (the smoke's 40-step warm start
    # may give none), always one on the gold labels.
    want = {"gold"} | {
        n for n in ("base", "grpo-s1", "agpo-s1") if n not in res["students_skipped"]
    }
    assert want <= set(res["students"])
    # Every annotator's pool labels came from its own samples: the files exist and agree.
    rows = (out / "annotations/agpo-s1/annotations.jsonl").read_text().splitlines()
    assert len(rows) == 60
    report = (out / "report.md").read_text()
    assert "Annotators on the gold test set" in report and "AGPO - GRPO" in report
    assert (out / "relevance_students.png").stat().st_size > 0
