"""Prompt data: file loaders (problem / verl shapes), the synthetic arithmetic task, the
character-level tokenizer of the tiny run, and a resumable epoch iterator."""

from megatron_agpo.data.arithmetic import (
    LEVELS,
    ArithmeticConfig,
    evaluate,
    generate_arithmetic,
    split_of,
)
from megatron_agpo.data.char_tokenizer import build_char_tokenizer
from megatron_agpo.data.iterator import PromptIterator, epoch_order
from megatron_agpo.data.loaders import (
    EncodeStats,
    PromptEncoding,
    encode_prompts,
    load_prompts,
    prompt_token_ids,
    read_rows,
    write_problem_jsonl,
)
from megatron_agpo.data.records import DataValidationError, PromptExample

__all__ = [
    "LEVELS",
    "ArithmeticConfig",
    "DataValidationError",
    "EncodeStats",
    "PromptEncoding",
    "PromptExample",
    "PromptIterator",
    "build_char_tokenizer",
    "encode_prompts",
    "epoch_order",
    "evaluate",
    "generate_arithmetic",
    "load_prompts",
    "prompt_token_ids",
    "read_rows",
    "split_of",
    "write_problem_jsonl",
]
