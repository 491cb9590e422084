"""A run's prompts, by `data.kind`: the synthetic arithmetic task, a MATH-style / verl file, or
search-ads relevance pairs. One entry point for the trainer (`load_task`).

Each source is registered in `DATA_SOURCES` (`register_source(name, config=...)`) with what
builds its (train, held-out) examples from the run's data section; a source with settings of
its own (relevance) has them as `data.<name>.*`. How every source's chats become token ids is
the data section's `prompt` (`PromptEncoding`: the chat template) and its token budget
`max_prompt_tokens`, applied here for all sources alike.

Prompts are tokenized here and filtered against what the engine can really take: a prompt
must leave room for the response inside the engine's context (max_model_len -
max_new_tokens), so a prompt that the engine would refuse is dropped and counted at load
time, not found at its first sampling hours into a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_agpo.data.loaders import (
    EncodeStats,
    encode_prompts,
    held_out_split,
    load_prompts,
)
from megatron_agpo.data.records import DataValidationError, PromptExample
from megatron_agpo.data.relevance import RelevanceDataConfig
from megatron_agpo.registry import Registry

DATA_SOURCES = Registry("data source", "data.kind")
register_source = DATA_SOURCES.register


@dataclass
class TaskPrompts:
    """Tokenized training and held-out prompts, and what the filter dropped."""

    train: list[PromptExample]
    held_out: list[PromptExample]
    stats: EncodeStats
    """Over both splits."""
    prompt_budget: int
    """The longest prompt kept, in tokens (the tighter of data.max_prompt_tokens and the
    engine's context minus the response budget)."""

    def stats_dict(self) -> dict[str, Any]:
        return asdict(self.stats)


def prompt_budget(max_prompt_tokens: int, max_model_len: int, max_new_tokens: int) -> int:
    """Tokens a prompt may use: the data limit, and room for a full response in the engine."""
    return min(max_prompt_tokens, max_model_len - max_new_tokens)


Examples = tuple[list[PromptExample], list[PromptExample]]
"""(train, held-out) examples, not yet tokenized."""


@register_source("arithmetic")
def arithmetic_examples(data) -> Examples:
    """The synthetic arithmetic task (data.levels, num_train, num_eval, seed)."""
    from megatron_agpo.data.arithmetic import ArithmeticConfig, generate_arithmetic

    a = ArithmeticConfig(
        levels=tuple(data.levels), seed=data.seed, num_train=data.num_train,
        num_eval=data.num_eval,
    )  # fmt: skip
    return generate_arithmetic(a, "train"), generate_arithmetic(a, "eval")


@register_source("math_jsonl")
def file_examples(data) -> Examples:
    """A MATH-style or verl file (data.path, data.format, its rows made chats by data.prompt);
    the first num_eval rows held out. Raises `DataValidationError` naming file, row and field
    (`megatron_agpo.validate` runs this before launch)."""
    path = str(Path(data.path).expanduser()) if data.path else ""
    rows = load_prompts(path, data.format, data.prompt)
    held, train = held_out_split(rows, data.num_eval, path)
    return train, held


@register_source("relevance", config=RelevanceDataConfig)
def relevance_source(data) -> Examples:
    """Search-ads query-item pairs (data.relevance)."""
    from megatron_agpo.data.relevance import relevance_examples

    return relevance_examples(data)


def load_task(data, tokenizer, max_model_len: int, max_new_tokens: int) -> TaskPrompts:
    """`data` is the run's DataSection; the engine's context and response budget bound the
    prompts (see the module docstring)."""
    train, held = DATA_SOURCES.get(data.kind).build(data)
    budget = prompt_budget(data.max_prompt_tokens, max_model_len, max_new_tokens)
    if budget < 1:
        raise ValueError(
            f"rollout.max_new_tokens={max_new_tokens} leaves no room for a prompt in "
            f"rollout.engine.max_model_len={max_model_len}"
        )
    chat = data.prompt.use_chat_template
    train, s_train = encode_prompts(train, tokenizer, budget, chat)
    held, s_held = encode_prompts(held, tokenizer, budget, chat)
    stats = EncodeStats(
        total=s_train.total + s_held.total,
        kept=s_train.kept + s_held.kept,
        too_long=s_train.too_long + s_held.too_long,
        too_long_indices=(s_train.too_long_indices + s_held.too_long_indices)[:20],
        longest_kept=max(s_train.longest_kept, s_held.longest_kept),
    )
    if not train:
        raise DataValidationError(
            f"data.kind={data.kind}: no training prompt fits in {budget} tokens "
            f"(rollout.engine.max_model_len={max_model_len} - rollout.max_new_tokens="
            f"{max_new_tokens}, data.max_prompt_tokens={data.max_prompt_tokens}); "
            f"{stats.too_long} of {stats.total} prompts were too long"
        )
    return TaskPrompts(train=train, held_out=held, stats=stats, prompt_budget=budget)
