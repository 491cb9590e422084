"""The interface every task's reward implements, and the counters it reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class RewardStats:
    """Counts since the reward was built (or last reset); a snapshot, safe to keep."""

    calls: int = 0
    """Responses scored."""
    timeouts: int = 0
    """Verifications that overran the deadline (the worker was replaced, the answer retried)."""
    errors: int = 0
    """Verifications that raised or whose worker died (the answer retried)."""
    retries: int = 0
    """Verifications run again after a timeout or an error."""
    unscored: int = 0
    """Answers that could not be scored on any try: NaN, dropped with their group."""
    outcomes: dict[str, int] = field(default_factory=dict)
    """Responses per outcome. For the math reward: correct, incorrect, no_answer,
    empty_answer, competing_answers, echoed_prompt, unparsable_ground_truth, timeout, error."""

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat name -> value for a metrics logger."""
        out = {
            f"{prefix}calls": float(self.calls),
            f"{prefix}timeouts": float(self.timeouts),
            f"{prefix}errors": float(self.errors),
            f"{prefix}retries": float(self.retries),
            f"{prefix}unscored": float(self.unscored),
        }
        out.update({f"{prefix}{k}": float(v) for k, v in sorted(self.outcomes.items())})
        return out


class RewardUnavailable(RuntimeError):
    """Too many answers of one batch could not be scored (the verifier is failing): the run
    stops with this message rather than train on a partial batch."""


def reward_counters(stats: RewardStats) -> dict[str, float]:
    """What metrics.jsonl records of a reward's failures each step (counts since the start)."""
    return {
        "reward/errors": float(stats.errors),
        "reward/timeouts": float(stats.timeouts),
        "reward/retries": float(stats.retries),
        "reward/unscored": float(stats.unscored),
    }


def scored_groups(rewards: Sequence[float], n: int) -> list[int]:
    """Indices of the samples whose whole group (n consecutive samples) was scored: a NaN
    reward (unscored) drops its group, as dynamic sampling drops a group without signal."""
    keep = []
    for g in range(0, len(rewards), n):
        group = rewards[g : g + n]
        if all(r == r for r in group):
            keep.extend(range(g, g + len(group)))
    return keep


@runtime_checkable
class Reward(Protocol):
    """A reward maps (response, ground truth) to a float. Tasks (math, search-ads relevance,
    ...) implement this; the trainer sees only this interface."""

    def __call__(self, response: str, ground_truth: str, *, prompt: str | None = None) -> float:
        """Score one response. `prompt` is the problem text, for checks that need it."""
        ...

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        prompts: Sequence[str] | None = None,
    ) -> list[float]:
        """Score many responses, in parallel where the reward can; same order as given. NaN
        marks an answer that could not be scored (the trainer drops its group)."""
        ...

    def stats(self) -> RewardStats:
        """Counters so far."""
        ...
