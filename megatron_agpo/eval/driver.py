"""The sampling driver: n samples per problem, scored, written incrementally, resumable.

The engine and the grader are injected (`generate_fn`, `score_fn`), so the driver runs
without vLLM and is tested with plain functions. Every problem gets its own seed, derived
from the run's seed and the problem's (benchmark, id) only, so its samples do not depend on
which other problems share its batch, nor on whether the run was interrupted.

The results file is append-only JSONL: a header line with the run's settings, then one line
per finished problem, flushed and fsync'ed after each batch. A killed run is resumed by
calling `evaluate` again with the same arguments: finished problems are read back, not
regenerated; a torn last line (the process died mid-write) is cut off.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from megatron_agpo.eval.benchmarks import EvalProblem
from megatron_agpo.eval.results import ProblemResult

FORMAT_VERSION = 1

# The instruction the Qwen2.5-Math and DeepSeek evaluations append; math_reward reads \boxed{}.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class GenerateFn(Protocol):
    """Samples n completions for each prompt; prompt i is sampled with seeds[i]."""

    def __call__(self, prompts: list[str], n: int, seeds: list[int]) -> list[list[str]]: ...


ScoreFn = Callable[[str, str], float]
"""score_fn(response, reference_answer) -> reward; above the threshold counts as correct."""

ScoreBatchFn = Callable[[list[str], list[str]], list[float]]
"""score_batch_fn(responses, reference_answers) -> rewards: a batched grader (e.g. one that
fans out over worker processes), used in place of ScoreFn when given."""


def default_prompt(problem: EvalProblem) -> str:
    """problem text followed by the \\boxed{} instruction (no chat template: the engine side
    applies the model's own)."""
    return f"{problem.problem}\n{BOXED_INSTRUCTION}"


def problem_seed(seed: int, benchmark: str, problem_id: str) -> int:
    """A 31-bit seed for one problem, a pure function of (seed, benchmark, id).

    A hash, not seed + index: inserting or reordering problems must not change the samples
    of the others (vLLM takes any int seed per request).
    """
    digest = hashlib.sha256(f"{seed}\x00{benchmark}\x00{problem_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_log(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and problem records of a results file; cuts off a torn last line in place."""
    if not path.exists() or path.stat().st_size == 0:
        return None, []
    data = path.read_bytes()
    lines = data.split(b"\n")
    # A complete file ends with "\n", so the last element is b"". Anything else is a line the
    # writer did not finish; a line that does not parse can only be that one.
    good_end = len(data) - len(lines[-1])
    body = lines[:-1]
    records: list[dict[str, Any]] = []
    for i, line in enumerate(body):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(body) - 1 or lines[-1]:
                raise ValueError(
                    f"{path}: line {i + 1} is not valid JSON (not a torn last "
                    f"line: the file is damaged)"
                ) from None
            good_end -= len(line) + 1
    if good_end != len(data):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    if not records:
        return None, []
    header, rest = records[0], records[1:]
    if header.get("kind") != "header":
        raise ValueError(f"{path}: first line is not an eval header")
    return header, rest


def _append(fh, records: Sequence[Mapping[str, Any]]) -> None:
    fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    fh.flush()
    # fsync: a finished problem is on disk before the next batch starts; a crash loses at
    # most the batch in flight.
    os.fsync(fh.fileno())


def _to_result(record: Mapping[str, Any]) -> ProblemResult:
    return ProblemResult(
        benchmark=record["benchmark"],
        id=record["id"],
        n=record["n"],
        c=record["c"],
        scores=tuple(record["scores"]),
        completions=tuple(record.get("completions", ())),
    )


def read_results_file(path: str | Path) -> list[ProblemResult]:
    """The finished problems recorded in a results file, in the order they were written."""
    _, records = _read_log(Path(path))
    return [_to_result(r) for r in records]


def evaluate(
    generate_fn: GenerateFn,
    score_fn: ScoreFn | None,
    problems: Sequence[EvalProblem],
    n: int,
    seed: int,
    results_path: str | Path,
    *,
    prompt_fn: Callable[[EvalProblem], str] = default_prompt,
    batch_size: int = 16,
    correct_threshold: float = 0.5,
    save_completions: bool = False,
    score_batch_fn: ScoreBatchFn | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[ProblemResult]:
    """Sample n completions per problem, score them, and record (n, c) per problem.

    Args:
        generate_fn: engine, called with up to batch_size prompts and their per-problem seeds.
        score_fn: grader, score_fn(completion, problem.answer) -> float (may be None when
            score_batch_fn is given).
        problems: the problems, (benchmark, id) unique.
        n: samples per problem.
        seed: run seed; problem seeds derive from it (`problem_seed`).
        results_path: append-only JSONL; resumed from when it exists.
        prompt_fn: problem -> prompt text.
        batch_size: problems per generate_fn call (does not change any result).
        correct_threshold: a sample is correct when its score is strictly above this (AGPO's
            tau).
        save_completions: also store the sampled texts (large at n = 256).
        score_batch_fn: optional batched grader, called once per batch instead of score_fn
            per sample (128k math-verify calls at 500 problems x 256 samples).
        settings: extra run settings (model, temperature, ...) stored in the header; resuming
            with different ones is refused, as is a different n, seed or threshold.
        progress: called with (done, total) after each batch.

    Returns:
        One ProblemResult per problem, in the order of problems; identical whether the run
        went through at once or was resumed.
    """
    if n < 1:
        raise ValueError(f"evaluate: n={n} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size={batch_size} must be >= 1")
    if score_fn is None and score_batch_fn is None:
        raise ValueError("evaluate: give score_fn or score_batch_fn")
    keys = [(p.benchmark, p.id) for p in problems]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"evaluate: problem {dup[0]}/{dup[1]} appears more than once")

    path = Path(results_path)
    header = {
        "kind": "header",
        "version": FORMAT_VERSION,
        "n": n,
        "seed": seed,
        "correct_threshold": correct_threshold,
        "settings": dict(settings or {}),
    }
    # Round-trip through JSON so that the comparison below sees what a resumed run reads.
    header = json.loads(json.dumps(header))
    old_header, old_records = _read_log(path)
    if old_header is not None:
        for field in ("version", "n", "seed", "correct_threshold", "settings"):
            if old_header.get(field) != header[field]:
                raise ValueError(
                    f"{path}: written with {field}={old_header.get(field)!r}, now "
                    f"{field}={header[field]!r}: resume with the same settings or use "
                    f"another results path"
                )
    done: dict[tuple[str, str], dict[str, Any]] = {
        (r["benchmark"], r["id"]): r for r in old_records
    }

    prompts = {k: prompt_fn(p) for k, p in zip(keys, problems, strict=True)}
    for p, k in zip(problems, keys, strict=True):
        r = done.get(k)
        # The same id with another prompt or answer: the data or the template changed, and the
        # stored counts would describe different questions.
        if r is not None and (r["prompt_sha"] != _sha(prompts[k]) or r["answer"] != p.answer):
            raise ValueError(
                f"{path}: {p.benchmark}/{p.id} was recorded with another prompt "
                f"or answer: the data or prompt template changed"
            )

    todo = [p for p, k in zip(problems, keys, strict=True) if k not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        if old_header is None:
            _append(fh, [header])
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            batch_prompts = [prompts[(p.benchmark, p.id)] for p in batch]
            seeds = [problem_seed(seed, p.benchmark, p.id) for p in batch]
            outputs = generate_fn(batch_prompts, n, seeds)
            if len(outputs) != len(batch):
                raise ValueError(
                    f"generate_fn returned {len(outputs)} outputs for {len(batch)} prompts"
                )
            for p, texts in zip(batch, outputs, strict=True):
                if len(texts) != n:
                    raise ValueError(
                        f"generate_fn returned {len(texts)} completions for "
                        f"{p.benchmark}/{p.id}, expected n={n}"
                    )
            flat = [t for texts in outputs for t in texts]
            answers = [p.answer for p in batch for _ in range(n)]
            if score_batch_fn is not None:
                flat_scores = [float(x) for x in score_batch_fn(flat, answers)]
                if len(flat_scores) != len(flat):
                    raise ValueError(
                        f"score_batch_fn returned {len(flat_scores)} scores for "
                        f"{len(flat)} responses"
                    )
            else:
                flat_scores = [float(score_fn(t, a)) for t, a in zip(flat, answers, strict=True)]
            new = []
            for j, (p, s, texts) in enumerate(zip(batch, seeds, outputs, strict=True)):
                scores = flat_scores[j * n : (j + 1) * n]
                if any(math.isnan(x) for x in scores):
                    raise ValueError(f"score_fn returned NaN for {p.benchmark}/{p.id}")
                record = {
                    "kind": "problem",
                    "benchmark": p.benchmark,
                    "id": p.id,
                    "seed": s,
                    "prompt_sha": _sha(prompts[(p.benchmark, p.id)]),
                    "answer": p.answer,
                    "n": n,
                    "c": sum(x > correct_threshold for x in scores),
                    "scores": scores,
                }
                if save_completions:
                    record["completions"] = list(texts)
                new.append(record)
            _append(fh, new)
            done.update(((r["benchmark"], r["id"]), r) for r in new)
            if progress is not None:
                progress(len(problems) - len(todo) + start + len(batch), len(problems))
    return [_to_result(done[k]) for k in keys]
