"""pass@k evaluation of one checkpoint with vLLM, and side-by-side reports of several.

    python tools/eval_passk.py --model ckpt/hf --label agpo \
        --data math500=data/math500.jsonl aime24=data/aime24.parquet \
        --n 256 --seed 0 --out runs/eval/agpo
    python tools/eval_passk.py --compare base=runs/eval/base agpo=runs/eval/agpo \
        --out runs/eval/compare

    python tools/eval_passk.py --model ckpt/hf --data gsm8k=data/gsm8k.jsonl \
        --problem-field question --n 8 --out runs/eval/gsm8k   # any other name: generic

A run writes <out>/samples.jsonl (per problem, resumable: rerun the same command after a
crash), then results.json, results.md and passk.png. --compare adds finished runs (their
samples.jsonl) to the report. vLLM and the math reward are imported only when sampling.
Every prompt is checked against the model's context before the engine starts; an input or
engine failure is reported in one paragraph naming the cause and the setting to change
(--debug: the full traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_agpo.eval.benchmarks import (
    EvalProblem,
    canonical_name,
    generic_spec,
    load_benchmark,
)
from megatron_agpo.eval.driver import (
    BOXED_INSTRUCTION,
    GenerateFn,
    ScoreBatchFn,
    ScoreFn,
    evaluate,
    read_results_file,
)
from megatron_agpo.eval.results import ProblemResult, group_by_benchmark, write_results

SAMPLES_FILE = "samples.jsonl"
PROG = "eval_passk"


class EvalError(Exception):
    """A failure explained in one paragraph (cause and the setting to change)."""


def _pairs(values: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"{flag}: expected NAME=PATH, got {v!r}")
        out.append((name, rest))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_passk", description="pass@k of a checkpoint on math benchmarks (vLLM)."
    )
    p.add_argument(
        "--model",
        help="HF model directory to sample from (omit with --compare to only build a report)",
    )
    p.add_argument(
        "--label",
        help="name of this checkpoint in tables and plots (default: the model directory's name)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="benchmarks to run, each NAME=FILE (.jsonl, .json or .parquet): math500, aime24, "
        "amc23, minerva, olympiadbench read their releases' fields; any other NAME is a "
        "generic benchmark with problem / answer / id fields (see --problem-field)",
    )
    p.add_argument(
        "--problem-field",
        help="generic benchmarks: the problem's field (default: problem, else question)",
    )
    p.add_argument(
        "--answer-field",
        help="generic benchmarks: the final answer's field (default: answer, else final_answer)",
    )
    p.add_argument(
        "--id-field",
        help="generic benchmarks: the id's field (default: id, unique_id, idx; else the row index)",
    )
    p.add_argument(
        "--instruction",
        default=BOXED_INSTRUCTION,
        help="text put after each problem (default: the \\boxed{} instruction; '' for none)",
    )
    p.add_argument("--n", type=int, default=16, help="samples per problem (pass@k up to k=n)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each problem's derives from it")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16, help="problems per vLLM call")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed the raw prompt instead of the model's chat template",
    )
    p.add_argument(
        "--save-completions",
        action="store_true",
        help="also keep the sampled texts in samples.jsonl",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="LABEL=RUN_DIR",
        help="finished runs to put beside this one in the report",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        help="engine context (prompt + response); default: the model's max_position_embeddings",
    )
    p.add_argument("--dtype", default="auto", help="engine dtype (auto: the checkpoint's)")
    p.add_argument(
        "--cpu-kvcache-gib",
        type=int,
        help="CPU only: KV cache size in GiB (default: a quarter of the free memory, 1-8 GiB)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="GPU only: share of GPU memory vLLM may take",
    )
    p.add_argument(
        "--verbosity",
        choices=("quiet", "info", "debug"),
        default="info",
        help="vLLM's logging: quiet (errors), info (warnings), debug (everything)",
    )
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    p.add_argument("--no-plot", action="store_true")
    return p


def model_context(model: str) -> int | None:
    """max_position_embeddings from the model folder's config.json; None when unreadable."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings") or cfg.get("max_seq_len")
    return int(value) if value else None


def make_renderer(tokenizer: Any, chat_template: bool) -> Callable[[str], str]:
    """prompt -> the text the engine sees (the model's chat template unless disabled)."""
    use_template = chat_template and getattr(tokenizer, "chat_template", None)

    def render(prompt: str) -> str:
        if not use_template:
            return prompt
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    return render


def check_prompt_budget(
    problems: Sequence[EvalProblem],
    prompts: Sequence[str],
    count_tokens: Callable[[str], int],
    max_model_len: int,
    max_new_tokens: int,
) -> int:
    """Refuse, before the engine starts, prompts that do not fit the context with the
    response budget (the engine would fail on them mid-run); returns the longest prompt's
    length in tokens."""
    budget = max_model_len - max_new_tokens
    if budget < 1:
        raise EvalError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
            f"{max_model_len}-token context (--max-model-len): lower --max-new-tokens"
        )
    lengths = [count_tokens(t) for t in prompts]
    over = [(p, n) for p, n in zip(problems, lengths, strict=True) if n > budget]
    if over:
        first = ", ".join(f"{p.benchmark}/{p.id} ({n})" for p, n in over[:3])
        raise EvalError(
            f"{len(over)} of {len(prompts)} prompts do not fit: the context is {max_model_len} "
            f"tokens and --max-new-tokens {max_new_tokens} leaves {budget} for the prompt, "
            f"but the longest prompt has {max(lengths)} tokens (first: {first}). Lower "
            f"--max-new-tokens, raise --max-model-len (up to the model's context), or shorten "
            f"the prompt (--instruction '' drops the instruction, --no-chat-template the chat "
            f"wrapper)."
        )
    return max(lengths) if lengths else 0


def make_vllm_generate(
    model: str,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    tensor_parallel_size: int = 1,
    chat_template: bool = True,
    *,
    max_model_len: int | None = None,
    dtype: str = "auto",
    cpu_kvcache_gib: int | None = None,
    gpu_memory_utilization: float = 0.9,
) -> GenerateFn:
    """A GenerateFn backed by one vllm.LLM, built by the trainer's engine builder
    (`megatron_agpo.rollout.vllm_engine.build_llm`: CPU KV cache share and chunked-prefill
    handling in one place); each prompt gets its own seeded SamplingParams."""
    from vllm import SamplingParams

    from megatron_agpo.rollout.config import RolloutConfig
    from megatron_agpo.rollout.vllm_engine import build_llm

    config = RolloutConfig(
        model_path=model,
        dtype=dtype,
        max_model_len=max_model_len or model_context(model) or 4096,
        seed=0,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_sleep_mode=False,  # one engine, never put to sleep
        cpu_kvcache_space_gib=cpu_kvcache_gib,
    )
    llm = build_llm(config)
    render = make_renderer(llm.get_tokenizer(), chat_template)

    def generate(prompts: list[str], n: int, seeds: list[int]) -> list[list[str]]:
        # One SamplingParams per prompt: a per-request seed makes a problem's samples
        # independent of the batch it lands in, which the resumable driver relies on.
        params = [
            SamplingParams(
                n=n, seed=s, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens
            )
            for s in seeds
        ]
        outs = llm.generate([render(p) for p in prompts], params, use_tqdm=False)
        return [[o.text for o in out.outputs] for out in outs]

    return generate


def load_math_reward() -> tuple[ScoreFn, ScoreBatchFn]:
    """The project's math reward, per sample and batched (parallel workers), imported lazily
    so that the loaders and the report need neither math-verify nor its worker pool."""
    from megatron_agpo.rewards import math_reward, score_batch

    return math_reward, score_batch


def load_problems(
    data: Sequence[tuple[str, str]],
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
) -> list[EvalProblem]:
    """All problems of the --data pairs, benchmark by benchmark, in file order. A name that
    is not one of the five named benchmarks is a generic one (the given fields)."""
    names = [canonical_name(b, generic=True) for b, _ in data]
    if len(set(names)) != len(names):
        raise SystemExit(f"--data: a benchmark is given twice: {names}")
    spec = generic_spec(problem_field, answer_field, id_field)
    return [p for (b, path) in data for p in load_benchmark(b, path, spec)]


def make_prompt_fn(instruction: str) -> Callable[[EvalProblem], str]:
    """problem -> prompt: the problem, then the instruction on its own line (if any)."""

    def prompt(problem: EvalProblem) -> str:
        return f"{problem.problem}\n{instruction}" if instruction else problem.problem

    return prompt


def _progress(label: str, total: int) -> Callable[[int, int], None]:
    t0 = time.monotonic()
    print(f"[{PROG}] {label}: {total} problems", file=sys.stderr, flush=True)

    def report(done: int, total: int) -> None:
        spent = time.monotonic() - t0
        rate = spent / max(done, 1)
        left = f", ~{_dur(rate * (total - done))} left" if done < total else ""
        print(
            f"[{PROG}] {label}: {done}/{total} problems ({100 * done // total}%), "
            f"{_dur(spent)}{left}",
            file=sys.stderr,
            flush=True,
        )

    return report


def _dur(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run(
    args: argparse.Namespace,
    generate_fn: GenerateFn | None = None,
    score_fn: ScoreFn | None = None,
) -> dict:
    """The CLI's work with injectable engine and grader (tests pass simple ones)."""
    out = Path(args.out)
    runs: dict[str, dict[str, list[ProblemResult]]] = {}
    if args.model:
        if not args.data:
            raise SystemExit("--model needs --data BENCH=PATH ...")
        problems = load_problems(
            _pairs(args.data, "--data"),
            getattr(args, "problem_field", None),
            getattr(args, "answer_field", None),
            getattr(args, "id_field", None),
        )
        label = args.label or Path(args.model.rstrip("/")).name
        instruction = getattr(args, "instruction", BOXED_INSTRUCTION)
        prompt_fn = make_prompt_fn(instruction)
        if generate_fn is None:
            generate_fn = _checked_engine(args, problems, prompt_fn)
        score_batch_fn = None
        if score_fn is None:
            score_fn, score_batch_fn = load_math_reward()
        settings = {
            "model": str(args.model),
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "chat_template": not args.no_chat_template,
        }
        if instruction != BOXED_INSTRUCTION:  # runs with the default keep their old header
            settings["instruction"] = instruction
        results = evaluate(
            generate_fn,
            score_fn,
            problems,
            args.n,
            args.seed,
            out / SAMPLES_FILE,
            prompt_fn=prompt_fn,
            batch_size=args.batch_size,
            save_completions=args.save_completions,
            score_batch_fn=score_batch_fn,
            progress=_progress(label, len(problems)),
            settings=settings,
        )
        runs[label] = group_by_benchmark(results)
    for label, run_dir in _pairs(args.compare, "--compare"):
        if label in runs:
            raise SystemExit(f"--compare: label {label!r} used twice")
        runs[label] = group_by_benchmark(read_results_file(Path(run_dir) / SAMPLES_FILE))
    if not runs:
        raise SystemExit("nothing to do: give --model with --data, or --compare")
    summary = write_results(runs, out, plot=not args.no_plot)
    print((out / "results.md").read_text(), end="")
    return summary


def _checked_engine(
    args: argparse.Namespace, problems: Sequence[EvalProblem], prompt_fn
) -> GenerateFn:
    """Check every prompt against the context with the model's own tokenizer (seconds),
    then start the engine (a minute or more)."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise EvalError(
            f"--model {args.model}: not a local HF model folder (no config.json there); "
            f"give the folder (export a Megatron checkpoint with "
            f"tools/convert_megatron_to_hf.py)"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    max_model_len = args.max_model_len or model_context(str(model)) or 4096
    render = make_renderer(tokenizer, not args.no_chat_template)
    longest = check_prompt_budget(
        problems,
        [render(prompt_fn(p)) for p in problems],
        lambda text: len(tokenizer(text)["input_ids"]),
        max_model_len,
        args.max_new_tokens,
    )
    print(
        f"[{PROG}] prompts fit: longest {longest} tokens + {args.max_new_tokens} new of "
        f"{max_model_len}",
        file=sys.stderr,
        flush=True,
    )
    return make_vllm_generate(
        str(model),
        args.temperature,
        args.top_p,
        args.max_new_tokens,
        args.tensor_parallel_size,
        chat_template=not args.no_chat_template,
        max_model_len=max_model_len,
        dtype=args.dtype,
        cpu_kvcache_gib=args.cpu_kvcache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )


# Known engine failures: (text in the error, cause and the setting to change).
_KNOWN_FAILURES = (
    (
        "CPU Generator does not use offset",
        "vLLM's CPU engine split a seeded request's prefill into chunks (chunked prefill), "
        "which it cannot do with per-request seeds. The engine builder "
        "(megatron_agpo.rollout.vllm_engine.engine_kwargs) turns chunked prefill off on CPU; "
        "something turned it back on",
    ),
    (
        "less than requested memory for kv",
        "not enough free memory for the CPU KV cache: lower --cpu-kvcache-gib (or "
        "VLLM_CPU_KVCACHE_SPACE) or free memory",
    ),
    (
        "larger than the available KV cache memory",
        "the KV cache cannot hold one sequence of --max-model-len tokens: raise "
        "--cpu-kvcache-gib (CPU) / --gpu-memory-utilization (GPU) or lower --max-model-len",
    ),
    (
        "No available memory for the cache blocks",
        "no memory left for the KV cache: raise --gpu-memory-utilization or --cpu-kvcache-gib, "
        "or use a smaller model / --tensor-parallel-size > 1",
    ),
    (
        "out of memory",
        "the engine ran out of memory: lower --batch-size, --n or --max-model-len, or raise "
        "--tensor-parallel-size",
    ),
    (
        "max_model_len",
        "--max-model-len does not fit the model: leave it unset (the model's own context) or "
        "lower it",
    ),
)


def known_failure(e: BaseException) -> str | None:
    """The cause-and-fix text of a known engine failure in e (or its causes), else None."""
    chain = "\n".join(str(c) for c in (e, *_causes(e))).lower()
    for needle, cause in _KNOWN_FAILURES:
        if needle.lower() in chain:
            return cause
    return None


def explain(e: BaseException) -> str:
    """One paragraph for an engine failure: the cause, the setting to change."""
    said = " ".join(str(e).split())
    if len(said) > 300:
        said = said[:297] + "..."
    cause = known_failure(e)
    if cause:
        return f"{cause}. (vLLM said: {said}) Rerun with --debug for the full traceback."
    return f"{type(e).__name__}: {said}. Rerun with --debug for the full traceback."


def _causes(e: BaseException):
    seen = set()
    c = e.__cause__ or e.__context__
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        yield c
        c = c.__cause__ or c.__context__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_agpo.backends import vllm_log_level

    # vLLM reads its level when it is imported (later, when the engine starts).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", vllm_log_level(args.verbosity))
    try:
        run(args)
    except EvalError as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - reported in one paragraph (--debug: traceback)
        if args.debug:
            raise
        input_error = isinstance(e, ValueError | OSError) and known_failure(e) is None
        # A bad data file or path: its message names file, row and field already.
        msg = " ".join(str(e).split()) if input_error else explain(e)
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2 if input_error else 1
    return 0


if __name__ == "__main__":
    from megatron_agpo.launcher import leave

    leave(main())  # without the interpreter's teardown of the torch / vLLM modules
