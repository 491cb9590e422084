"""The relevance reward's format rules and scores, on hand-worked cases."""

from __future__ import annotations

import pytest

from megatron_agpo.rewards.registry import build_reward
from megatron_agpo.rewards.relevance import RelevanceReward, RelevanceRewardConfig


@pytest.mark.parametrize(
    "response, gold, score, outcome",
    [
        ("\\boxed{E}", "E", 1.0, "correct"),
        ("\\boxed{ exact }", "E", 1.0, "correct"),  # name, case and space ignored
        ("same brand and type, so \\boxed{E}", "Exact", 1.0, "correct"),  # gold by name
        ("\\fbox{S}", "S", 1.0, "correct"),
        ("\\boxed{S}", "E", 0.0, "incorrect"),
        ("\\boxed{I}", "C", 0.0, "incorrect"),
        ("E", "E", 0.0, "no_answer"),
        ("\\boxed{E", "E", 0.0, "no_answer"),  # never closed: truncated
        ("\\boxed{E}\\boxed{E}", "E", 0.0, "multiple_answers"),  # even when they agree
        ("\\boxed{E} or \\boxed{S}", "E", 0.0, "multiple_answers"),
        ("\\boxed{E or S}", "E", 0.0, "unknown_label"),
        ("\\boxed{}", "E", 0.0, "unknown_label"),
        ("\\boxed{__import__('os').system('true')}", "E", 0.0, "unknown_label"),
        ("\\boxed{E}", "Z", 0.0, "unknown_ground_truth"),
    ],
)
def test_exact_match_rules(response, gold, score, outcome):
    r = RelevanceReward()
    assert r(response, gold) == score
    assert r.stats().outcomes == {outcome: 1} and r.stats().calls == 1


def test_ordinal_partial_credit_by_hand():
    # ESCI order E > S > C > I, K = 4: credit 1 - |i - j| / 3.
    r = RelevanceReward(RelevanceRewardConfig(ordinal=True))
    got = [r(f"\\boxed{{{p}}}", "E") for p in "ESCI"]
    assert got == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert r("\\boxed{I}", "C") == pytest.approx(2 / 3)
    assert r("\\boxed{X}", "E") == 0.0 and r("nothing", "E") == 0.0  # malformed stays 0
    assert r.stats().outcomes == {"correct": 1, "incorrect": 4, "unknown_label": 1, "no_answer": 1}


def test_custom_five_grade_scale_and_batch():
    cfg = RelevanceRewardConfig(
        labels=["Perfect", "Excellent", "Good", "Fair", "Bad"], codes=["4", "3", "2", "1", "0"]
    )
    r = RelevanceReward(cfg)
    assert r.score_batch(["\\boxed{4}", "\\boxed{good}", "\\boxed{E}"], ["4", "Fair", "4"]) == [
        1.0,
        0.0,
        0.0,
    ]
    cfg.ordinal = True
    assert RelevanceReward(cfg)("\\boxed{Good}", "Fair") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 responses but 1"):
        r.score_batch(["a", "b"], ["4"])


def test_chosen_by_config():
    from megatron_agpo.trainer.config import RewardSection

    section = RewardSection(name="relevance")
    section.relevance.ordinal = True
    reward = build_reward(section)
    assert isinstance(reward, RelevanceReward) and reward.config.ordinal
    assert reward("\\boxed{S}", "E") == pytest.approx(2 / 3)
    metrics = reward.stats().as_metrics()
    assert metrics["reward/incorrect"] == 1.0 and metrics["reward/calls"] == 1.0
