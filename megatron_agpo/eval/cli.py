"""pass@k evaluation of one checkpoint with vLLM, and side-by-side reports of several.

    python tools/eval_passk.py --model ckpt/hf --label agpo \
        --data math500=data/math500.jsonl aime24=data/aime24.parquet \
        --n 256 --seed 0 --out runs/eval/agpo
    python tools/eval_passk.py --compare base=runs/eval/base agpo=runs/eval/agpo \
        --out runs/eval/compare

A run writes <out>/samples.jsonl (per problem, resumable: rerun the same command after a
crash), then results.json, results.md and passk.png. --compare adds finished runs (their
samples.jsonl) to the report. vLLM and the math reward are imported only when sampling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_agpo.eval.benchmarks import EvalProblem, canonical_name, load_benchmark
from megatron_agpo.eval.driver import (
    GenerateFn,
    ScoreBatchFn,
    ScoreFn,
    default_prompt,
    evaluate,
    read_results_file,
)
from megatron_agpo.eval.results import ProblemResult, group_by_benchmark, write_results

SAMPLES_FILE = "samples.jsonl"


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
        metavar="BENCH=PATH",
        help="benchmarks to run: math500, aime24, amc23, minerva, olympiadbench "
        "= a .jsonl, .json or .parquet file",
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
    p.add_argument("--no-plot", action="store_true")
    return p


def make_vllm_generate(
    model: str,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    tensor_parallel_size: int = 1,
    chat_template: bool = True,
) -> GenerateFn:
    """A GenerateFn backed by one vllm.LLM; each prompt gets its own seeded SamplingParams."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, seed=0)
    tokenizer = llm.get_tokenizer()
    use_template = chat_template and getattr(tokenizer, "chat_template", None)

    def render(prompt: str) -> str:
        if not use_template:
            return prompt
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

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


def load_problems(data: Sequence[tuple[str, str]]) -> list[EvalProblem]:
    """All problems of the --data pairs, benchmark by benchmark, in file order."""
    names = [canonical_name(b) for b, _ in data]
    if len(set(names)) != len(names):
        raise SystemExit(f"--data: a benchmark is given twice: {names}")
    return [p for (b, path) in data for p in load_benchmark(b, path)]


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
        problems = load_problems(_pairs(args.data, "--data"))
        label = args.label or Path(args.model.rstrip("/")).name
        if generate_fn is None:
            generate_fn = make_vllm_generate(
                args.model,
                args.temperature,
                args.top_p,
                args.max_new_tokens,
                args.tensor_parallel_size,
                chat_template=not args.no_chat_template,
            )
        score_batch_fn = None
        if score_fn is None:
            score_fn, score_batch_fn = load_math_reward()

        def progress(done: int, total: int) -> None:
            print(f"[eval_passk] {label}: {done}/{total} problems", file=sys.stderr, flush=True)

        results = evaluate(
            generate_fn,
            score_fn,
            problems,
            args.n,
            args.seed,
            out / SAMPLES_FILE,
            prompt_fn=default_prompt,
            batch_size=args.batch_size,
            save_completions=args.save_completions,
            score_batch_fn=score_batch_fn,
            progress=progress,
            settings={
                "model": str(args.model),
                "temperature": args.temperature,
                "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens,
                "chat_template": not args.no_chat_template,
            },
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
