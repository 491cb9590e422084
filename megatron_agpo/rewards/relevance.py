"""The verifiable relevance reward: the annotator's label against the gold label.

Answer format (the one rule, fixed): the completion holds exactly one ``\\boxed{...}`` (or
``\\fbox{...}``) whose content, stripped and case-folded, is a label's code or name ("E" or
"exact" for ESCI's Exact). Text around the box is allowed (reasoning first, then the box).

Scores: 1 for the gold label, 0 for another label. With `ordinal: true` a wrong label gets
partial credit ``1 - |i - j| / (K - 1)`` for labels i, j of an ordered set of K (ESCI:
Substitute for Exact scores 2/3). Zero, whatever the gold label, and counted in `stats()`:

- ``no_answer``: no closed box;
- ``multiple_answers``: two or more boxes, even if they agree;
- ``unknown_label``: the box holds something that is not a label.

A gold label outside the label set is a data error: scored 0, counted as
``unknown_ground_truth`` and logged. The reward only compares strings; nothing the model
wrote is parsed as code, evaluated or executed.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_agpo.data.relevance import ESCI_CODES, ESCI_NAMES, LabelSet
from megatron_agpo.rewards.answer import find_boxes
from megatron_agpo.rewards.base import RewardStats
from megatron_agpo.rewards.registry import register_reward

logger = logging.getLogger(__name__)

ZERO_REASONS = ("no_answer", "multiple_answers", "unknown_label", "unknown_ground_truth")
_LOGGED_PER_REASON = 5  # a few examples of each malformed kind in the log, then counts only


@dataclass
class RelevanceRewardConfig:
    """`reward.relevance`: the label set the answers are read against and the scoring rule."""

    labels: list[str] = field(default_factory=lambda: list(ESCI_NAMES))
    """Label names, most relevant first (must match data.relevance.labels)."""
    codes: list[str] = field(default_factory=lambda: list(ESCI_CODES))
    """Short codes, same order (empty: the names); the answer may give a code or a name."""
    ordinal: bool = False
    """Partial credit 1 - |i - j| / (K - 1) for a wrong label j of gold i (0: exact match
    only). With AGPO's tau = 0 every partly right answer counts as positive."""


def parse_label(response: str, labels: LabelSet) -> tuple[int | None, str | None]:
    """(label index, None) for a well-formed answer, else (None, zero reason)."""
    boxes = find_boxes(response)
    if not boxes:
        return None, "no_answer"
    if len(boxes) > 1:
        return None, "multiple_answers"
    i = labels.lookup(boxes[0].content)
    if i is None:
        return None, "unknown_label"
    return i, None


def label_score(pred: int, gold: int, k: int, ordinal: bool) -> float:
    """1 for the gold label; with `ordinal`, 1 - |pred - gold| / (k - 1); else 0."""
    if pred == gold:
        return 1.0
    return 1.0 - abs(pred - gold) / (k - 1) if ordinal else 0.0


class RelevanceReward:
    """`Reward` for relevance labels. Pure string work, so scoring runs inline (no workers);
    thread-safe."""

    def __init__(self, config: RelevanceRewardConfig | None = None):
        self.config = config or RelevanceRewardConfig()
        self.labels = LabelSet.of(self.config.labels, self.config.codes)
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()
        self._calls = 0

    def _record(self, outcome: str, response: str) -> None:
        with self._lock:
            self._calls += 1
            self._outcomes[outcome] += 1
            n = self._outcomes[outcome]
        if outcome in ZERO_REASONS and n <= _LOGGED_PER_REASON:
            logger.warning("relevance reward: %s (scored 0): %.80r", outcome, response)

    def __call__(self, response: str, ground_truth: str, *, prompt: str | None = None) -> float:
        gold = self.labels.lookup(ground_truth)
        if gold is None:
            self._record("unknown_ground_truth", ground_truth)
            return 0.0
        pred, reason = parse_label(response, self.labels)
        if reason is not None:
            self._record(reason, response)
            return 0.0
        assert pred is not None
        self._record("correct" if pred == gold else "incorrect", response)
        return label_score(pred, gold, len(self.labels), self.config.ordinal)

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        prompts: Sequence[str] | None = None,
    ) -> list[float]:
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        return [self(r, g) for r, g in zip(responses, ground_truths, strict=True)]

    def stats(self) -> RewardStats:
        with self._lock:
            return RewardStats(calls=self._calls, outcomes=dict(self._outcomes))

    def close(self) -> None:
        """Nothing to release (no workers)."""

    def __enter__(self) -> RelevanceReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@register_reward("relevance", config=RelevanceRewardConfig)
def build_relevance_reward(section) -> RelevanceReward:
    """`reward.name=relevance`: the relevance reward with `reward.relevance`'s settings."""
    return RelevanceReward(section.relevance)
