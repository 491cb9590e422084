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
    """Verifications that overran the deadline (scored 0; the worker was replaced)."""
    errors: int = 0
    """Verifications that raised or whose worker died (scored 0)."""
    outcomes: dict[str, int] = field(default_factory=dict)
    """Responses per outcome. For the math reward: correct, incorrect, no_answer,
    empty_answer, competing_answers, echoed_prompt, unparsable_ground_truth, timeout, error."""

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat name -> value for a metrics logger."""
        out = {
            f"{prefix}calls": float(self.calls),
            f"{prefix}timeouts": float(self.timeouts),
            f"{prefix}errors": float(self.errors),
        }
        out.update({f"{prefix}{k}": float(v) for k, v in sorted(self.outcomes.items())})
        return out


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
        """Score many responses, in parallel where the reward can; same order as given."""
        ...

    def stats(self) -> RewardStats:
        """Counters so far."""
        ...
