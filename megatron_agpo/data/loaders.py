"""Prompt datasets from JSONL or parquet files, in the two shapes people already have.

Shapes (`DataConfig.format`):

- ``problem``: MATH-style rows ``{"problem": str, "answer": str | int}``; the keys can be
  renamed with `problem_key` / `answer_key` (e.g. ``question``). The answer must be the final
  answer itself, not a worked solution (GSM8K's "... #### 42" needs converting first). The
  chat is: optional system prompt, then one user turn ``problem + instruction_suffix``. Other
  fields go to `metadata`.
- ``verl``: verl's rows ``{"prompt": [{"role", "content"}, ...], "reward_model":
  {"ground_truth": str | int, ...}, "data_source": str?, "extra_info": dict?}``. The chat is used
  as written (verl prompts already carry their instruction); the system prompt is added only
  when the chat has none.

Every row is validated; an error names the file, the row index (and the line for JSONL) and
the field. Prompts longer than `max_prompt_tokens` after the chat template are dropped and
counted (`EncodeStats`), never truncated: a cut prompt would ask a different question.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from megatron_agpo.data.files import read_rows
from megatron_agpo.data.records import DataValidationError, PromptExample

logger = logging.getLogger(__name__)

RowFormat = Literal["problem", "verl"]
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they become token ids."""

    path: str = ""
    """A .jsonl or .parquet file."""
    format: RowFormat = "problem"
    """Row shape: problem ({problem, answer}) or verl ({prompt: chat,
    reward_model: {ground_truth}})."""
    problem_key: str = "problem"
    """problem format: the field holding the problem text."""
    answer_key: str = "answer"
    """problem format: the field holding the final answer."""
    system_prompt: str | None = None
    """Optional system turn put before the user turn (verl: only if the chat has none)."""
    instruction_suffix: str = "\nPut the final answer in \\boxed{}."
    """problem format: appended to the problem in the user turn. The reward needs the box."""
    max_prompt_tokens: int = 1024
    """Longer prompts (after the chat template) are dropped and counted, never truncated."""
    use_chat_template: bool = True
    """Tokenize through the tokenizer's chat template (with the generation prompt); False
    tokenizes the user turn's text alone, for base models without a template."""
    shuffle_seed: int = 0
    """Seed of the per-epoch order of `PromptIterator`."""

    def __post_init__(self) -> None:
        if self.format not in ("problem", "verl"):
            raise ValueError(f"DataConfig.format must be problem or verl, got {self.format!r}")
        if self.max_prompt_tokens < 1:
            raise ValueError(
                f"DataConfig.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}"
            )


@dataclass
class EncodeStats:
    """What `encode_prompts` kept and dropped."""

    total: int = 0
    """Examples seen."""
    kept: int = 0
    """Examples within the token limit."""
    too_long: int = 0
    """Examples dropped because their prompt exceeds `max_prompt_tokens`."""
    too_long_indices: list[int] = field(default_factory=list)
    """Row indices of the first 20 dropped examples, to find them in the file."""
    longest_kept: int = 0
    """Longest kept prompt, in tokens."""


# ---- reading rows ----


# ---- validating rows ----


def _field(row: Any, key: str, where: str, expected: type | tuple[type, ...]) -> Any:
    if not isinstance(row, dict):
        raise DataValidationError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise DataValidationError(f"{where}: missing field {key!r}")
    value = row[key]
    # bool is an int in Python; an answer of `true` is a data error, not 1.
    if isinstance(value, bool) or not isinstance(value, expected):
        names = (
            expected.__name__
            if isinstance(expected, type)
            else " or ".join(t.__name__ for t in expected)
        )
        raise DataValidationError(
            f"{where}: field {key!r}: expected {names}, got {type(value).__name__}"
        )
    return value


def _answer(row: dict, key: str, where: str, name: str) -> str:
    value = _field(row, key, where, (str, int))
    text = str(value).strip()
    if not text:
        raise DataValidationError(f"{where}: field {name!r} is empty")
    return text


def _text(row: dict, key: str, where: str, name: str) -> str:
    value = _field(row, key, where, str)
    if not value.strip():
        raise DataValidationError(f"{where}: field {name!r} is empty")
    return value


def parse_problem_row(
    index: int, where: str, row: Any, cfg: DataConfig, source: str
) -> PromptExample:
    """A {problem, answer} row -> PromptExample."""
    problem = _text(row, cfg.problem_key, where, cfg.problem_key)
    answer = _answer(row, cfg.answer_key, where, cfg.answer_key)
    messages: list[dict[str, str]] = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": problem + cfg.instruction_suffix})
    metadata = {k: v for k, v in row.items() if k not in (cfg.problem_key, cfg.answer_key)}
    return PromptExample(index, tuple(messages), problem, answer, source, metadata)


def parse_verl_row(index: int, where: str, row: Any, cfg: DataConfig, source: str) -> PromptExample:
    """A verl row -> PromptExample."""
    chat = _field(row, "prompt", where, list)
    if not chat:
        raise DataValidationError(f"{where}: field 'prompt' is an empty list")
    messages: list[dict[str, str]] = []
    for j, m in enumerate(chat):
        name = f"prompt[{j}]"
        if not isinstance(m, dict):
            raise DataValidationError(
                f"{where}: field {name!r}: expected a message object, got {type(m).__name__}"
            )
        role = _field(m, "role", f"{where}: field {name!r}", str)
        if role not in _ROLES:
            raise DataValidationError(
                f"{where}: field '{name}.role': expected one of {_ROLES}, got {role!r}"
            )
        content = _field(m, "content", f"{where}: field {name!r}", str)
        messages.append({"role": role, "content": content})
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise DataValidationError(f"{where}: field 'prompt' has no non-empty user message")
    reward_model = _field(row, "reward_model", where, dict)
    answer = _answer(reward_model, "ground_truth", f"{where}: field 'reward_model'", "ground_truth")
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    data_source = row.get("data_source")
    metadata = {k: v for k, v in row.items() if k not in ("prompt", "reward_model", "data_source")}
    return PromptExample(
        index,
        tuple(messages),
        users[-1],
        answer,
        data_source if isinstance(data_source, str) and data_source else source,
        metadata,
    )


def load_prompts(cfg: DataConfig) -> list[PromptExample]:
    """Read and validate every row of `cfg.path`; raises `DataValidationError` on the first
    bad row (a dataset with bad rows is fixed, not silently thinned)."""
    if not cfg.path:
        raise ValueError("DataConfig.path is empty")
    parse = parse_problem_row if cfg.format == "problem" else parse_verl_row
    source = Path(cfg.path).stem
    rows = [parse(i, where, row, cfg, source) for i, where, row in read_rows(cfg.path)]
    if not rows:
        raise DataValidationError(f"{cfg.path}: no rows (the file is empty)")
    return rows


def held_out_split(
    rows: Sequence[PromptExample], num_eval: int, path: str = ""
) -> tuple[list[PromptExample], list[PromptExample]]:
    """(held-out, train): the first `num_eval` rows are held out. Refuses a file that would
    leave nothing to train on, instead of silently holding every row out."""
    if num_eval < 0:
        raise ValueError(f"num_eval={num_eval} must be >= 0")
    if len(rows) <= num_eval:
        raise DataValidationError(
            f"{path or 'the prompt set'}: {len(rows)} rows, not more than the {num_eval} "
            f"held out for evaluation (data.num_eval): nothing left to train on; lower "
            f"data.num_eval or add rows"
        )
    return list(rows[:num_eval]), list(rows[num_eval:])


# ---- tokenizing ----


def prompt_token_ids(example: PromptExample, tokenizer: Any, cfg: DataConfig) -> list[int]:
    """Token ids of the prompt the policy continues (chat template + generation prompt)."""
    if cfg.use_chat_template:
        ids = tokenizer.apply_chat_template(
            list(example.messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    return list(tokenizer(example.messages[-1]["content"], add_special_tokens=True)["input_ids"])


def encode_prompts(
    examples: Sequence[PromptExample], tokenizer: Any, cfg: DataConfig
) -> tuple[list[PromptExample], EncodeStats]:
    """Fill `prompt_ids`; drop (and count) prompts over `cfg.max_prompt_tokens`."""
    stats = EncodeStats(total=len(examples))
    kept: list[PromptExample] = []
    for ex in examples:
        ids = prompt_token_ids(ex, tokenizer, cfg)
        if len(ids) > cfg.max_prompt_tokens:
            stats.too_long += 1
            if len(stats.too_long_indices) < 20:
                stats.too_long_indices.append(ex.index)
            continue
        stats.longest_kept = max(stats.longest_kept, len(ids))
        kept.append(replace(ex, prompt_ids=tuple(ids)))
    stats.kept = len(kept)
    if stats.too_long:
        logger.warning(
            "dropped %d of %d prompts longer than %d tokens (first rows: %s)",
            stats.too_long,
            stats.total,
            cfg.max_prompt_tokens,
            stats.too_long_indices,
        )
    return kept, stats


def write_problem_jsonl(examples: Sequence[PromptExample], path: str | Path) -> None:
    """Write examples as problem-format JSONL ({problem, answer, source, ...metadata})."""
    with Path(path).open("w", encoding="utf-8") as f:
        for ex in examples:
            row = {"problem": ex.problem, "answer": ex.ground_truth, "source": ex.source}
            row.update(ex.metadata)
            f.write(json.dumps(row) + "\n")
