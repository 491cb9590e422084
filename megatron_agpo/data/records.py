"""The typed record every prompt source produces, and the error every loader raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class DataValidationError(ValueError):
    """A row that cannot be used. The message names the file, the row and the field."""


@dataclass(frozen=True)
class PromptExample:
    """One prompt and its reference answer, as the trainer and the reward see it."""

    index: int
    """Row index in its source (0-based, data rows only: blank JSONL lines are not rows)."""
    messages: tuple[dict[str, str], ...]
    """The chat the policy answers: {"role": system|user|assistant, "content": str} dicts,
    with the configured system prompt and instruction suffix already applied."""
    problem: str
    """The problem as written in the source (without instruction suffix or system prompt):
    what the reward's echo check compares against and what logs show."""
    ground_truth: str
    """The reference answer handed to the reward."""
    source: str
    """Where the row came from: the file's data_source field, the file name, or the generator."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Other fields of the row, kept for logging and evaluation breakdowns (level, subject)."""
    prompt_ids: tuple[int, ...] = ()
    """Token ids of the chat-templated prompt (with the generation prompt); empty until
    `encode_prompts` fills it."""
