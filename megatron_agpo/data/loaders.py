"""Prompt datasets from JSONL or parquet files, in the two shapes people already have.

Shapes (the `format` argument of `load_prompts`; the trainer's `data.format`):

- ``problem``: MATH-style rows ``{"problem": str, "answer": str | int}``; the keys can be
  renamed with `problem_key` / `answer_key` (e.g. ``question``). The answer must be the final
  answer itself, not a worked solution (GSM8K's "... #### 42" needs converting first). The
  chat is: optional system prompt, then one user turn ``problem + instruction_suffix``. Other
  fields go to `metadata`.
- ``verl``: verl's rows ``{"prompt": [{"role", "content"}, ...], "reward_model":
  {"ground_truth": str | int, ...}, "data_source": str?, "extra_info": dict?}``. The chat is used
  as written (verl prompts already carry their instruction); the system prompt is added only
  when the chat has none.

Where the rows come from (file and shape) is the caller's: the trainer's `data.path` and
`data.format`. How a row becomes a chat and a chat token ids is `PromptEncoding` (the
trainer's `data.prompt`). The token budget is the caller's too (`data.max_prompt_tokens`,
tightened by the engine's context in `megatron_agpo.data.tasks`).

Every row is validated; an error names the file, the row index (and the line for JSONL) and
the field. Prompts longer than the budget after the chat template are dropped and counted
(`EncodeStats`), never truncated: a cut prompt would ask a different question.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from megatron_agpo.data.files import read_rows
from megatron_agpo.data.records import DataValidationError, PromptExample
from megatron_agpo.registry import need

logger = logging.getLogger(__name__)

ROW_FORMATS: tuple[str, ...] = ("problem", "verl")
"""The row shapes `load_prompts` reads (the trainer's `data.format`)."""
_ROLES = ("system", "user", "assistant")


@dataclass
class PromptEncoding:
    """`data.prompt`: how a file's rows become chats (data.kind=math_jsonl) and every chat
    token ids (all kinds)."""

    problem_key: str = "problem"
    """math_jsonl, data.format=problem: the field holding the problem text (e.g. question)."""
    answer_key: str = "answer"
    """math_jsonl, data.format=problem: the field holding the final answer."""
    system_prompt: str | None = None
    """math_jsonl: a system turn put before the user turn (verl rows: only if the chat has
    none). null: none."""
    instruction_suffix: str = "\nPut the final answer in \\boxed{}."
    """math_jsonl, data.format=problem: appended to the problem in the user turn (the math
    reward needs the box)."""
    use_chat_template: bool = True
    """Tokenize through the tokenizer's chat template (with the generation prompt); false
    tokenizes the last turn's text alone, for base models without a template."""

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        for key in ("problem_key", "answer_key"):
            need(out, bool(getattr(self, key)), prefix + key, getattr(self, key),
                 "must name a field")  # fmt: skip
        if self.problem_key and self.problem_key == self.answer_key:
            out.append(
                f"{prefix}answer_key={self.answer_key!r}: must differ from "
                f"{prefix}problem_key={self.problem_key!r}"
            )
        return out


@dataclass
class EncodeStats:
    """What `encode_prompts` kept and dropped."""

    total: int = 0
    """Examples seen."""
    kept: int = 0
    """Examples within the token limit."""
    too_long: int = 0
    """Examples dropped because their prompt exceeds the token budget."""
    too_long_indices: list[int] = field(default_factory=list)
    """Row indices of the first 20 dropped examples, to find them in the file."""
    longest_kept: int = 0
    """Longest kept prompt, in tokens."""


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
    index: int, where: str, row: Any, cfg: PromptEncoding, source: str
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


def parse_verl_row(
    index: int, where: str, row: Any, cfg: PromptEncoding, source: str
) -> PromptExample:
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


def load_prompts(
    path: str | Path, format: str = "problem", encoding: PromptEncoding | None = None
) -> list[PromptExample]:
    """Read and validate every row of `path` (a .jsonl, .json or .parquet file of `format`
    rows, made chats by `encoding`); raises `DataValidationError` on the first bad row (a
    dataset with bad rows is fixed, not silently thinned)."""
    if not str(path):
        raise ValueError("path is empty")
    if format not in ROW_FORMATS:
        raise ValueError(f"format={format!r}: {' or '.join(ROW_FORMATS)}")
    enc = encoding if encoding is not None else PromptEncoding()
    parse = parse_problem_row if format == "problem" else parse_verl_row
    source = Path(path).stem
    rows = [parse(i, where, row, enc, source) for i, where, row in read_rows(path)]
    if not rows:
        raise DataValidationError(f"{path}: no rows (the file is empty)")
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


def prompt_token_ids(
    example: PromptExample, tokenizer: Any, use_chat_template: bool = True
) -> list[int]:
    """Token ids of the prompt the policy continues: the chat template with the generation
    prompt, or (use_chat_template=False) the last turn's text alone."""
    if use_chat_template:
        ids = tokenizer.apply_chat_template(
            list(example.messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    return list(tokenizer(example.messages[-1]["content"], add_special_tokens=True)["input_ids"])


def encode_prompts(
    examples: Sequence[PromptExample],
    tokenizer: Any,
    max_tokens: int,
    use_chat_template: bool = True,
) -> tuple[list[PromptExample], EncodeStats]:
    """Fill `prompt_ids` (`prompt_token_ids`); drop (and count) prompts over `max_tokens`."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    stats = EncodeStats(total=len(examples))
    kept: list[PromptExample] = []
    for ex in examples:
        ids = prompt_token_ids(ex, tokenizer, use_chat_template)
        if len(ids) > max_tokens:
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
            max_tokens,
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
