"""A user's reward with settings of its own, registered the documented way (imported by a run
with `imports=[tests.plugin_reward]`)."""

from __future__ import annotations

from dataclasses import dataclass

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
