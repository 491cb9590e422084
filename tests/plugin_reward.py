"""A user's reward with settings of its own and an advantage rule, registered the documented
way (imported by a run with `imports=[tests.plugin_reward]`)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_agpo.algorithms.advantages import register_rule
from megatron_agpo.rewards import register_reward


@dataclass
class LengthRewardConfig:
    """`reward.length`: reward short answers."""

    target: int = 4
    """Answers up to this many characters score 1."""
    penalty: float = 0.5
    """Score of a longer answer."""

    def problems(self, prefix: str) -> list[str]:
        return [f"{prefix}target={self.target}: must be >= 1"] if self.target < 1 else []


class LengthReward:
    def __init__(self, cfg: LengthRewardConfig) -> None:
        self.cfg = cfg

    def score_batch(self, responses, ground_truths, prompts=None):
        return [1.0 if len(r) <= self.cfg.target else self.cfg.penalty for r in responses]

    def stats(self):
        return {}

    def close(self):
        pass


@register_reward("length", config=LengthRewardConfig)
def build_length_reward(section) -> LengthReward:
    return LengthReward(section.length)


@register_rule("rank")
def rank_rule(r_GN, group_score, weight, sign, cfg):
    """A user's advantage rule: w x the response's reward rank in its group, centred
    (ties broken by position), in [-1, 1]."""
    g = r_GN.shape[1]
    ranks = r_GN.argsort(dim=1, stable=True).argsort(dim=1).to(r_GN.dtype)
    return weight * (2 * ranks / max(g - 1, 1) - 1)
