"""agpo-annotate's bad inputs are one line each, before any engine starts: a hub id (no
network wait), a missing folder, an empty input, a pair longer than the context."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_agpo.data.relevance import RelevanceRecord, write_records
from megatron_agpo.relevance.annotate import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return tiny_hf_model(tmp_path_factory.mktemp("tiny"))


def _fail(argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("agpo-annotate: ") and "\n" not in msg, msg
    assert match in msg, msg
    return msg


def test_bad_inputs_fail_before_the_engine(tmp_path, tiny, monkeypatch):
    import megatron_agpo.relevance.annotate as annotate

    def no_engine(*a, **k):
        raise AssertionError("the engine was started")

    monkeypatch.setattr(annotate, "make_vllm_generate", no_engine)
    pairs = write_records(
        [RelevanceRecord("a", "kettle", "kolo kettle", None, "q1")], tmp_path / "p.jsonl",
        with_labels=False,
    )  # fmt: skip
    out = ["--out", str(tmp_path / "out")]
    _fail(["--model", "org/model", "--input", str(pairs), *out], "hub ids are not downloaded")
    _fail(["--model", str(tmp_path / "nope"), "--input", str(pairs), *out], "no such folder")
    (tmp_path / "empty.jsonl").write_text("")
    _fail(["--model", str(tiny), "--input", str(tmp_path / "empty.jsonl"), *out],
          "empty.jsonl holds no pairs")  # fmt: skip
    long = write_records(
        [RelevanceRecord("long1", "kettle", "kolo kettle " * 400, None, "q1")],
        tmp_path / "long.jsonl", with_labels=False,
    )  # fmt: skip
    msg = _fail(["--model", str(tiny), "--input", str(long), "--max-model-len", "256", *out],
                "pair 'long1' is a ")  # fmt: skip
    assert "longer than the 240 tokens the context leaves" in msg


@pytest.mark.e2e
def test_hub_id_is_refused_at_once_without_traceback(tmp_path):
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, "-m", "megatron_agpo.relevance.annotate", "--model", "org/model",
         "--input", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "hub ids are not downloaded" in res.stderr
    assert time.time() - t0 < 30
