"""agpo-annotate without vLLM: an injected engine, hand-worked votes and gold metrics,
resume after a torn write, and the --help text."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_agpo.data.char_tokenizer import build_char_tokenizer
from megatron_agpo.data.relevance import LabelSet, RelevanceRecord, write_records
from megatron_agpo.relevance.annotate import build_parser, read_annotations, run

# What the fake annotator answers for each title, k = 4 samples.
ANSWERS = {
    "kolo kettle x2 red": ["\\boxed{E}", "\\boxed{E}", "\\boxed{S}", "junk"],  # E, 2/4
    "kolo kettle filter": ["\\boxed{C}", "\\boxed{I}", "\\boxed{C}\\boxed{C}", "x"],  # C/I tie
    "tarn bike x1 red": ["no box"] * 4,  # nothing valid
    "vexa kettle x2 blue": ["\\boxed{S}"] * 4,
}


class FakeEngine:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, prompts, n, seeds):
        assert n == 4 and len(seeds) == len(prompts)
        self.calls.append(len(prompts))
        # The prompt is the chat-templated text: "<bos>q:<query>|i:<title>|".
        return [ANSWERS[p.split("|i:")[1].rstrip("|")] for p in prompts]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _pairs(tmp_path):
    recs = [
        RelevanceRecord("a", "kolo kettle x2", "kolo kettle x2 red", "Exact", "q1"),
        RelevanceRecord("b", "kolo kettle x2", "kolo kettle filter", "Irrelevant", "q1"),
        RelevanceRecord("c", "kolo kettle x2", "tarn bike x1 red", "Irrelevant", "q1"),
        RelevanceRecord("d", "kolo kettle x2", "vexa kettle x2 blue", "Substitute", "q1"),
    ]
    pool = write_records(recs, tmp_path / "pool.jsonl", with_labels=False)
    gold = write_records(recs, tmp_path / "gold.jsonl")
    return pool, gold


def _args(tmp_path, *extra):
    pool, gold = _pairs(tmp_path)
    return build_parser().parse_args(
        ["--model", "unused", "--input", str(pool), "--gold", str(gold), "--k", "4",
         "--batch-size", "3", "--out", str(tmp_path / "out"), *extra]
    )  # fmt: skip


def test_votes_confidence_and_gold_metrics_by_hand(tmp_path, tok):
    engine = FakeEngine()
    summary = run(_args(tmp_path), generate_fn=engine, tokenizer=tok)
    rows = [json.loads(x) for x in (tmp_path / "out/annotations.jsonl").read_text().splitlines()]
    assert [(r["id"], r["label"], r["confidence"], r["votes"], r["malformed"]) for r in rows] == [
        ("a", "Exact", 0.5, {"E": 2, "S": 1}, 1),
        ("b", "Complement", 0.25, {"C": 1, "I": 1}, 2),  # tie -> the more relevant label
        ("c", None, 0.0, {}, 4),
        ("d", "Substitute", 1.0, {"S": 4}, 0),
    ]
    assert "label" not in json.loads((tmp_path / "pool.jsonl").read_text().splitlines()[0])
    g = summary["gold"]
    # Majority right for a and d: 2/4. Correct samples per pair (of 4): 2, 1, 0, 4.
    assert g["majority@4"] == 0.5
    assert g["pass@k"]["1"] == pytest.approx((2 + 1 + 0 + 4) / 16)
    # pass@2 = 1 - C(4-c, 2)/C(4, 2): c=2 -> 5/6, c=1 -> 1/2, c=0 -> 0, c=4 -> 1.
    assert g["pass@k"]["2"] == pytest.approx((5 / 6 + 1 / 2 + 0 + 1) / 4)
    assert g["pass@k"]["4"] == pytest.approx(3 / 4)
    assert g["malformed_share"] == pytest.approx(7 / 16)
    # Majority labels E, C, None, S against gold E, I, I, S: F1 E 1, S 1, C 0, I 0.
    assert g["macro_f1"] == pytest.approx(0.5)
    recs, conf = read_annotations(tmp_path / "out/annotations.jsonl", LabelSet())
    assert [r.id for r in recs] == ["a", "b", "d"] and conf == [0.5, 0.25, 1.0]


def test_resume_after_a_torn_write(tmp_path, tok):
    engine = FakeEngine()
    first = run(_args(tmp_path), generate_fn=engine, tokenizer=tok)
    assert engine.calls == [3, 1, 3, 1]  # batches of 3 pairs: pool, then gold
    samples = tmp_path / "out/samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:-1]) + lines[-1][:10])  # the last pair half-written
    engine2 = FakeEngine()
    again = run(_args(tmp_path), generate_fn=engine2, tokenizer=tok)
    assert engine2.calls == [1]  # only the torn pair is sampled again
    assert again == first
    with pytest.raises(ValueError, match="written with settings"):
        run(_args(tmp_path, "--temperature", "0.5"), generate_fn=FakeEngine(), tokenizer=tok)


def test_run_config_and_errors(tmp_path, tok):
    prompt = {"template": "{query}/{title}|i:{title}|"}
    cfg = {
        "data": {"relevance": {"labels": ["Good", "Bad"], "codes": ["G", "B"], "prompt": prompt}}
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    recs = [RelevanceRecord("a", "q", "kolo kettle x2 red", "Good")]
    gold = write_records(recs, tmp_path / "g.jsonl")
    args = build_parser().parse_args(
        ["--model", "m", "--gold", str(gold), "--k", "4", "--out", str(tmp_path / "o"),
         "--run-config", str(tmp_path / "config.json")]
    )  # fmt: skip
    seen = []

    def engine(prompts, n, seeds):
        seen.extend(prompts)
        return [["\\boxed{G}", "\\boxed{good}", "\\boxed{E}", "\\boxed{B}"]]

    g = run(args, generate_fn=engine, tokenizer=tok)["gold"]
    assert seen == ["<bos>q/kolo kettle x2 red|i:kolo kettle x2 red|"]
    assert g["majority@4"] == 1.0 and g["malformed_share"] == 0.25  # E is not a label here
    bad = write_records([RelevanceRecord("a", "q", "t", "Exact")], tmp_path / "bad.jsonl")
    args.gold = str(bad)
    with pytest.raises(SystemExit, match="bad.jsonl row 0 \\(line 1\\): field 'label'"):
        run(args, generate_fn=engine, tokenizer=tok)


@pytest.mark.e2e
def test_help_documents_inputs():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_agpo.relevance.annotate", "--help"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    for flag in ("--model", "--input", "--gold", "--k", "--run-config", "majority vote"):
        assert flag in out
