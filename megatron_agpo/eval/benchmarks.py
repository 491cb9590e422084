"""Loaders for the five math benchmarks the AGPO paper reports, from local files.

The benchmarks are not on any package index, so they are read from files in the shapes of
their public releases (JSONL, a JSON array, or parquet). Each benchmark names the fields that
may hold the problem, the answer and the id, in order of preference; the first present and
non-empty one wins. ../../docs/EVAL.md lists them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_agpo.rewards.answer import last_boxed


@dataclass(frozen=True)
class EvalProblem:
    """One benchmark problem with its reference answer."""

    benchmark: str
    """Canonical benchmark name (a key of BENCHMARKS), e.g. "math500"."""
    id: str
    """Identifier unique within the benchmark (the release's id, else "row-<index>")."""
    problem: str
    """The question as given to the model (before any prompt template)."""
    answer: str
    """The reference final answer, as a string (what the math reward compares against)."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where one benchmark's release keeps its problem, answer and id."""

    problem_fields: tuple[str, ...]
    """Fields that may hold the problem text, in order of preference."""
    answer_fields: tuple[str, ...]
    """Fields that may hold the final answer, in order of preference."""
    id_fields: tuple[str, ...]
    """Fields that may hold the id; the row index is used when none is present."""
    boxed_answer_fields: tuple[str, ...] = ()
    """Fields holding a worked solution whose last \\boxed{...} is the answer, tried when no
    answer field is present (the Qwen2.5-Math Minerva set ships only the solution)."""
    context_field: str | None = None
    """A field whose non-empty text is put before the problem (OlympiadBench's shared context
    for multi-part physics questions)."""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    # HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id.
    "math500": BenchmarkSpec(("problem",), ("answer",), ("unique_id", "id")),
    # AI-MO/aimo-validation-aime: id, problem, solution, answer, url;
    # Maxwell-Jia/AIME_2024: ID, Problem, Solution, Answer.
    "aime24": BenchmarkSpec(
        ("problem", "Problem", "question"), ("answer", "Answer"), ("id", "ID", "idx")
    ),
    # AI-MO/aimo-validation-amc: id, problem, answer (a float such as 27.0), url.
    "amc23": BenchmarkSpec(("problem", "question"), ("answer",), ("id", "idx")),
    # math-ai/minervamath: question, answer; Qwen2.5-Math minerva_math: problem, solution, idx.
    "minerva": BenchmarkSpec(
        ("problem", "question"),
        ("answer", "final_answer"),
        ("id", "idx", "unique_id"),
        boxed_answer_fields=("solution",),
    ),
    # Hothan/OlympiadBench and Qwen2.5-Math olympiadbench: id, question, final_answer (a
    # list of LaTeX strings), context, solution (list), ...
    "olympiadbench": BenchmarkSpec(
        ("question", "problem"),
        ("final_answer", "answer"),
        ("id", "idx"),
        context_field="context",
    ),
}

_ALIASES = {
    "math-500": "math500",
    "math_500": "math500",
    "aime": "aime24",
    "aime2024": "aime24",
    "aime_2024": "aime24",
    "amc": "amc23",
    "amc2023": "amc23",
    "amc_2023": "amc23",
    "minerva_math": "minerva",
    "minervamath": "minerva",
    "minerva-math": "minerva",
    "olympiad": "olympiadbench",
    "olympiad_bench": "olympiadbench",
}

# Display names, for tables and plots.
DISPLAY_NAMES = {
    "math500": "MATH500",
    "aime24": "AIME24",
    "amc23": "AMC23",
    "minerva": "Minerva",
    "olympiadbench": "OlympiadBench",
}


# Any other --data name: a generic benchmark reading these fields (overridable per run).
GENERIC = BenchmarkSpec(
    problem_fields=("problem", "question"),
    answer_fields=("answer", "final_answer"),
    id_fields=("id", "unique_id", "idx"),
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def canonical_name(name: str, generic: bool = False) -> str:
    """The BENCHMARKS key for name (case-insensitive, common aliases accepted). With
    `generic`, any other name made of letters, digits, `_`, `.` and `-` is its own
    (lower-cased) key: a generic benchmark (`GENERIC` fields)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in BENCHMARKS:
        return key
    if generic and _NAME.match(key):
        return key
    if generic:
        raise ValueError(
            f"benchmark name {name!r}: use letters, digits, '_', '.' or '-' (at most 64)"
        )
    raise ValueError(
        f"unknown benchmark {name!r}: expected one of {sorted(BENCHMARKS)} "
        f"(or aliases {sorted(_ALIASES)})"
    )


def generic_spec(
    problem_field: str | None = None, answer_field: str | None = None, id_field: str | None = None
) -> BenchmarkSpec:
    """`GENERIC` with the given field names in place of its defaults."""
    return BenchmarkSpec(
        problem_fields=(problem_field,) if problem_field else GENERIC.problem_fields,
        answer_fields=(answer_field,) if answer_field else GENERIC.answer_fields,
        id_fields=(id_field,) if id_field else GENERIC.id_fields,
    )


def _strip_math(s: str) -> str:
    # OlympiadBench wraps its answers in $...$; the reward parses the bare LaTeX.
    s = s.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return s


def _as_text(value: Any) -> str | None:
    """A field value as text; None when absent or empty (so that the next field is tried)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None  # parquet and pandas write missing numbers as NaN
        # AMC's answers are floats (27.0); the reward compares with "27".
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        # OlympiadBench: final_answer is a list, several entries for multi-answer problems.
        parts = [t for t in (_as_text(v) for v in value) if t]
        return ", ".join(_strip_math(p) for p in parts) if parts else None
    text = str(value).strip()
    return text or None


def _first(row: Mapping[str, Any], fields: tuple[str, ...]) -> str | None:
    for f in fields:
        text = _as_text(row.get(f))
        if text is not None:
            return text
    return None


def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) for each row of a .jsonl, .json or .parquet file; location reads
    "<file> row <i> (line <n>)" (`megatron_agpo.data.files.read_rows`)."""
    from megatron_agpo.data.files import read_rows

    return ((where, row) for _, where, row in read_rows(path))


def parse_record(
    benchmark: str,
    record: Mapping[str, Any],
    index: int,
    where: str = "",
    path: str = "",
    spec: BenchmarkSpec | None = None,
) -> EvalProblem:
    """One release row as an EvalProblem; a ValueError names file, row and missing field.
    `spec`: the fields to read (default: the named benchmark's, else `GENERIC`)."""
    spec = spec or BENCHMARKS.get(benchmark, GENERIC)
    prefix = where or f"{path}: row {index}"
    problem = _first(record, spec.problem_fields)
    if problem is None:
        raise ValueError(
            f"{prefix}: {benchmark}: missing field 'problem' (looked for "
            f"{', '.join(spec.problem_fields)}; row has {sorted(record)})"
        )
    context = _as_text(record.get(spec.context_field)) if spec.context_field else None
    if context:
        problem = f"{context}\n\n{problem}"
    answer = _first(record, spec.answer_fields)
    if answer is None:
        for f in spec.boxed_answer_fields:
            solution = _as_text(record.get(f))
            answer = last_boxed(solution) if solution else None
            if answer:
                break
    if not answer:
        looked = spec.answer_fields + tuple(f"\\boxed{{}} in {f}" for f in spec.boxed_answer_fields)
        raise ValueError(
            f"{prefix}: {benchmark}: missing field 'answer' (looked for "
            f"{', '.join(looked)}; row has {sorted(record)})"
        )
    pid = _first(record, spec.id_fields) or f"row-{index}"
    return EvalProblem(benchmark=benchmark, id=pid, problem=problem, answer=_strip_math(answer))


def load_benchmark(
    name: str, path: str | Path, spec: BenchmarkSpec | None = None
) -> list[EvalProblem]:
    """All problems of benchmark name from path (.jsonl, .json or .parquet), in file order.

    `name` is one of the five named benchmarks, or, with `spec` (e.g. `generic_spec()`), any
    name: a generic benchmark whose rows have the spec's problem / answer / id fields.
    Raises ValueError naming the file, the row and the field when a row has no problem or no
    answer, and naming both rows when two share an id (results are keyed by id).
    """
    benchmark = canonical_name(name, generic=spec is not None)
    if benchmark in BENCHMARKS:
        spec = BENCHMARKS[benchmark]
    if Path(path).suffix.lower() in (".jsonl", ".json", ".parquet") and not Path(path).is_file():
        raise ValueError(f"{path}: no such file (benchmark {name})")
    problems: list[EvalProblem] = []
    first_row: dict[str, str] = {}
    for index, (where, record) in enumerate(read_records(path)):
        p = parse_record(benchmark, record, index, where, str(path), spec)
        if p.id in first_row:
            raise ValueError(f"{where}: duplicate id {p.id!r} (first at {first_row[p.id]})")
        first_row[p.id] = where
        problems.append(p)
    if not problems:
        raise ValueError(f"{path}: no rows")
    return problems
