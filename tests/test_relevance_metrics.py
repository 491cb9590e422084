"""Relevance metrics and the student, against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_agpo.data.relevance import (
    LabelSet,
    RelevanceRecord,
    SyntheticConfig,
    generate_synthetic,
)
from megatron_agpo.relevance.metrics import (
    bootstrap_interval,
    classification_metrics,
    majority_vote,
    ndcg_per_query,
    t_interval,
)
from megatron_agpo.relevance.student import (
    PairTokenizer,
    StudentConfig,
    score_predictions,
    train_student,
)

ESCI = LabelSet()


def test_classification_metrics_by_hand():
    # Per class (TP, FP, FN): E (1, 0, 1) -> F1 2/3; S (1, 1, 0) -> 2/3; C (1, 0, 0) -> 1;
    # I (1, 0, 1: the missing answer) -> 2/3. Macro: 0.75. Accuracy: 4 of 6.
    m = classification_metrics([0, 0, 1, 2, 3, 3], [0, 1, 1, 2, 3, None], ESCI)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx(0.75)
    assert [m[f"f1/{n}"] for n in ESCI.names] == pytest.approx([2 / 3, 2 / 3, 1.0, 2 / 3])
    # A class absent from gold and predictions scores 0 and still counts in the macro mean.
    assert classification_metrics([0, 1], [0, 1], ESCI)["macro_f1"] == pytest.approx(0.5)


def test_ndcg_by_hand():
    # q1: gains (3, 2, 0) ranked by scores -> order gains 2, 0, 3:
    # DCG = 2/log2(2) + 0/log2(3) + 3/log2(4) = 3.5; IDCG = 3 + 2/log2(3).
    # q2: a tie between gains 1 and 0 at the top: each position gets the mean gain 0.5:
    # DCG = 0.5 + 0.5/log2(3); IDCG = 1.
    # q3 (no relevant item) and q4 (one item) have no NDCG.
    got = ndcg_per_query(
        ["q1", "q1", "q1", "q2", "q2", "q3", "q3", "q4"],
        [3, 2, 0, 1, 0, 0, 0, 3],
        [0.1, 0.9, 0.5, 0.7, 0.7, 0.2, 0.1, 1.0],
    )
    assert got == pytest.approx(
        {"q1": 3.5 / (3 + 2 / math.log2(3)), "q2": 0.5 + 0.5 / math.log2(3)}
    )
    # Cut at k = 1: q1's top item has gain 2 of the ideal 3.
    assert ndcg_per_query(["q"] * 3, [3, 2, 0], [0.1, 0.9, 0.5], k=1)["q"] == pytest.approx(2 / 3)
    # A tie across the cut: gains 3 and 0 tied at the top share position 1's discount (1.5).
    assert ndcg_per_query(["q"] * 3, [0, 2, 3], [0.9, 0.1, 0.9], k=1)["q"] == pytest.approx(0.5)


def test_majority_vote_and_intervals():
    assert majority_vote([0, 1, 1, None], 4) == (1, 0.5)
    assert majority_vote([2, 1, None, None], 4) == (1, 0.25)  # tie: the more relevant label
    assert majority_vote([None, None], 2) == (None, 0.0)
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) * sd 1 / sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert math.isnan(t_interval([1.0])[1])
    m, lo, hi = bootstrap_interval({str(i): float(i % 2) for i in range(100)})
    assert m == 0.5 and 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # sd of the mean 0.05


def test_pair_tokenizer_by_hand():
    tok = PairTokenizer.build(["kolo kettle", "kolo kettle x2 red"])
    assert tok.itos == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "kettle", "kolo", "red", "x2"]
    ids, types = tok.encode("Kolo kettle", "kolo kettle blue", max_len=16)
    # [CLS] kolo kettle [SEP] kolo kettle [UNK] [SEP]; +2 marks words found on the other side.
    assert ids == [2, 5, 4, 3, 5, 4, 1, 3]
    assert types == [0, 2, 2, 0, 3, 3, 1, 1]


def test_score_predictions_by_hand():
    gold = [
        RelevanceRecord("a", "q", "t1", "Exact", query_id="1"),
        RelevanceRecord("b", "q", "t2", "Irrelevant", query_id="1"),
    ]
    # Predicted distributions: a -> mostly S (argmax wrong; expected gain 0.2*3 + 0.8*2 =
    # 2.2), b -> I (argmax right; gain 0.4*1 = 0.4): the ranking is right (NDCG 1), one label
    # of two is right.
    proba = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 0.4, 0.6]], dtype=torch.float64)
    m = score_predictions(gold, proba, ESCI)
    assert m["accuracy"] == 0.5 and m["ndcg@10"] == pytest.approx(1.0)
    assert m["f1/Irrelevant"] == 1.0 and m["f1/Exact"] == 0.0 and m["f1/Substitute"] == 0.0
    # Swap the expected gains: b now ranks first, NDCG = (0 + 3/log2(3)) / 3.
    proba2 = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert score_predictions(gold, proba2, ESCI)["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_student_learns_and_confidence_weighting_ignores_zero_weight_labels():
    splits = generate_synthetic(SyntheticConfig(queries=[0, 0, 0, 80, 20]), seed=5)
    pool, test = splits["pool"], splits["test"]
    cfg = StudentConfig(epochs=6, seed=0)
    clean = train_student(pool, ESCI, cfg).evaluate(test)
    assert clean["accuracy"] > 0.9, clean
    # Poison every other training label (a fixed wrong label) and give those pairs weight 0.
    poisoned = [
        r if i % 2 else RelevanceRecord(r.id, r.query, r.title, "Complement", r.query_id)
        for i, r in enumerate(pool)
    ]
    weights = [float(i % 2) for i in range(len(pool))]
    cfg_w = StudentConfig(epochs=6, seed=0, confidence_weighting=True)
    weighted = train_student(poisoned, ESCI, cfg_w, weights=weights).evaluate(test)
    unweighted = train_student(poisoned, ESCI, cfg).evaluate(test)
    assert weighted["accuracy"] > 0.85 > unweighted["accuracy"] + 0.1, (weighted, unweighted)
    with pytest.raises(ValueError, match="one weight per training pair"):
        train_student(pool, ESCI, cfg_w)


def test_report_tables_by_hand(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples/search_relevance"))
    import report

    def annot(f1):
        g = {"pairs": 4, "k": 2, "majority@2": f1, "macro_f1": f1, "malformed_share": 0.0,
             "pass@k": {"1": f1, "2": f1}}  # fmt: skip
        return {"gold": g, "mean_confidence": 1.0}

    def student(f1):
        return {"accuracy": f1, "macro_f1": f1, "ndcg@10": f1, "f1/Exact": f1,
                "f1/Substitute": f1, "f1/Complement": f1, "f1/Irrelevant": f1,
                "ndcg_per_query": {"q": f1}}  # fmt: skip

    names = {"base": 0.5, "grpo-s1": 0.6, "grpo-s2": 0.7, "agpo-s1": 0.8, "agpo-s2": 0.7}
    res = {
        "settings": {"queries": [1] * 5, "warmstart_steps": 1, "rl_steps": 1, "seeds": [1, 2],
                     "k": 2, "student_epochs": 1, "prompts_per_step": 1, "n": 2},
        "annotators": {n: annot(v) for n, v in names.items()},
        "students": {n: student(v) for n, v in {**names, "gold": 1.0}.items()},
        "times_s": dict.fromkeys(
            ("data", "warm_start", "rl", "annotation", "students", "total"), 1.0
        ),
        "machine": "m", "date": "d", "command": "c",
    }  # fmt: skip
    md = report.write_report(res, tmp_path).read_text()
    # GRPO macro-F1 over seeds (0.6, 0.7): mean 0.65, half-width t(0.975, 1) * 0.0707 / sqrt 2.
    half = 12.706204736174698 * (0.1 / math.sqrt(2)) / math.sqrt(2)
    assert f"| GRPO (2 seeds) | 0.650 [{0.65 - half:.3f}, {0.65 + half:.3f}]" in md
    # AGPO - GRPO by seed: +0.2 and 0.0 -> mean +0.1, same half-width formula on (0.2, 0).
    half_d = 12.706204736174698 * (0.2 / math.sqrt(2)) / math.sqrt(2)
    assert f"| annotator macro-F1 | +0.200, +0.000 | +0.100 [{0.1 - half_d:+.3f}, " in md
    assert "| gold labels (ceiling) (n=1) | 1.000 |" in md
