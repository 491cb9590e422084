"""SmolLM2-135M-Instruct's pass rate on the arithmetic task, before any training.

Uses the pieces the trainer uses: the arithmetic generator, the chat template
(`encode_prompts`), a vLLM engine, and the math-verify reward (last \\boxed{} only). Prints, for
each prompt variant, the pass rate, how often the response has a box at all, response lengths
and truncation, and a few sample responses.

    .venv/bin/python examples/smollm2_arithmetic/base_eval.py --levels 1 --n 8 --prompts 13
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

from make_data import chat  # this folder (a script's folder is on sys.path)

SUFFIX = "\nPut the final answer in \\boxed{}."
# How the user turn is written; the tokenizer's chat template wraps each (and adds SmolLM2's
# default system turn).
VARIANTS = {
    # what the trainer sends for data.kind=arithmetic: the expression alone
    "bare": lambda p: [{"role": "user", "content": p}],
    # plus the box instruction (what data.kind=math_jsonl format=problem appends)
    "boxed": lambda p: [{"role": "user", "content": p + SUFFIX}],
    # this example's data (make_data.py): two worked examples, then the question
    "fewshot": lambda p: chat(p.rstrip("=")),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1])
    p.add_argument("--prompts", type=int, default=13, help="held-out problems")
    p.add_argument("--n", type=int, default=8, help="samples per problem (temperature 1)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--split", default="eval", choices=["train", "eval"])
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="prompt variants (see VARIANTS)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (use --n 1)")
    p.add_argument("--show", type=int, default=3, help="sample responses printed per variant")
    args = p.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer

    from megatron_agpo.data.arithmetic import ArithmeticConfig, generate_arithmetic
    from megatron_agpo.data.loaders import encode_prompts
    from megatron_agpo.models.smollm2 import smollm2_hf_dir
    from megatron_agpo.rewards import MathReward, last_boxed
    from megatron_agpo.rollout.colocated import ColocatedEngine
    from megatron_agpo.rollout.config import RolloutConfig
    from megatron_agpo.rollout.types import RolloutRequest

    hf = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf)
    n_train = args.prompts if args.split == "train" else 1
    n_eval = args.prompts if args.split == "eval" else 1
    cfg = ArithmeticConfig(levels=tuple(args.levels), num_train=n_train, num_eval=n_eval)
    problems = generate_arithmetic(cfg, args.split)

    t0 = time.perf_counter()
    engine = ColocatedEngine(
        RolloutConfig(model_path=str(hf), dtype="float32", max_model_len=512, enforce_eager=True)
    )
    print(f"engine start {time.perf_counter() - t0:.1f} s", flush=True)
    reward = MathReward()
    try:
        for variant in args.variants:
            chats = [replace(ex, messages=tuple(VARIANTS[variant](ex.problem))) for ex in problems]
            enc, _ = encode_prompts(chats, tok, max_tokens=1024)
            reqs = [
                RolloutRequest(
                    ex.prompt_ids,
                    n=args.n,
                    temperature=args.temperature,
                    max_new_tokens=args.max_new_tokens,
                    seed=i,
                )
                for i, ex in enumerate(enc)
            ]
            t0 = time.perf_counter()
            samples = engine.generate(reqs).samples
            gen_s = time.perf_counter() - t0
            truths = [enc[s.prompt_id].ground_truth for s in samples]
            rewards = reward.score_batch([s.text for s in samples], truths)
            boxed = [last_boxed(s.text) is not None for s in samples]
            lens = [len(s.response_token_ids) for s in samples]
            per_level: dict[int, list[float]] = {}
            for s, r in zip(samples, rewards, strict=True):
                per_level.setdefault(enc[s.prompt_id].metadata["level"], []).append(r)
            solved = sum(
                any(r > 0 for s, r in zip(samples, rewards, strict=True) if s.prompt_id == i)
                for i in range(len(enc))
            )
            print(f"\n== {variant}: {len(enc)} {args.split} problems x n={args.n}, levels "
                  f"{args.levels}, temperature {args.temperature} ==")  # fmt: skip
            print("prompt:", repr(tok.decode(enc[0].prompt_ids)))
            print(
                f"pass rate {statistics.mean(rewards):.3f} | boxed {statistics.mean(boxed):.3f} | "
                f"problems with >=1 correct {solved}/{len(enc)} | len mean "
                f"{statistics.mean(lens):.1f} max {max(lens)} | truncated "
                f"{statistics.mean(s.truncated for s in samples):.3f} | "
                f"{sum(lens) / gen_s:.0f} tok/s ({gen_s:.1f} s)"
            )
            for lv, rs in sorted(per_level.items()):
                print(f"  level {lv}: pass rate {statistics.mean(rs):.3f} ({len(rs)} samples)")
            for s in samples[: args.show * args.n : args.n]:
                print(f"  [{enc[s.prompt_id].problem} -> {enc[s.prompt_id].ground_truth}] "
                      f"{s.text!r}")  # fmt: skip
    finally:
        reward.close()
        engine.close()
    return 0


if __name__ == "__main__":  # vLLM starts workers with spawn: the guard is required
    sys.exit(main())
