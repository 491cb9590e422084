"""The arithmetic task as a verl-format JSONL file, with a two-shot chat SmolLM2 can follow.

The trainer's built-in arithmetic data (`data.kind=arithmetic`) sends the bare expression
("3+9=") as the user turn, with no instruction: right for the tiny warm-started model, which
learnt to answer "\\boxed{12}", but SmolLM2-135M-Instruct then never writes a box and scores 0
(measured, see README.md). So this example writes the same problems (same generator, same
hash split, same level) to a file whose rows carry the chat as written: two worked examples
as earlier user/assistant turns, then the question with the box instruction. The trainer reads
it with `data=math_jsonl data.format=verl`; its first `--num-eval` rows are the held-out
prompts, so the eval split comes first.

    .venv/bin/python examples/smollm2_arithmetic/make_data.py --out data.jsonl --levels 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

INSTRUCTION = "Put the final answer in \\boxed{}."
# Worked examples shown before every question (level 2 expressions: never level-1 problems;
# any problem equal to one of them is dropped in any case).
SHOTS = (("2+13", "15"), ("14-6", "8"))


def question(expression: str) -> str:
    return f"What is {expression}? {INSTRUCTION}"


def chat(expression: str) -> list[dict[str, str]]:
    """The two-shot chat for one problem (the tokenizer's template adds the system turn)."""
    messages: list[dict[str, str]] = []
    for expr, answer in SHOTS:
        spaced = expr.replace("+", " + ").replace("-", " - ")
        messages.append({"role": "user", "content": question(expr)})
        messages.append({"role": "assistant", "content": f"{spaced} = \\boxed{{{answer}}}"})
    messages.append({"role": "user", "content": question(expression)})
    return messages


def problems(levels: tuple[int, ...], num_train: int, num_eval: int, seed: int = 0):
    """(eval, train) lists of (expression, answer, level), the trainer's generator and split."""
    from megatron_agpo.data.arithmetic import ArithmeticConfig, generate_arithmetic

    cfg = ArithmeticConfig(levels=levels, seed=seed, num_train=num_train, num_eval=num_eval)
    shots = {e for e, _ in SHOTS}
    out = []
    for split in ("eval", "train"):
        rows = [
            (ex.problem.rstrip("="), ex.ground_truth, ex.metadata["level"])
            for ex in generate_arithmetic(cfg, split)
        ]
        out.append([r for r in rows if r[0] not in shots])
    return out[0], out[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--levels", type=int, nargs="+", default=[1])
    p.add_argument("--num-train", type=int, default=87, help="level 1 has 87 train problems")
    p.add_argument("--num-eval", type=int, default=13, help="level 1 has 13 held-out problems")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    held, train = problems(tuple(args.levels), args.num_train, args.num_eval, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for split, rows in (("eval", held), ("train", train)):
            for expr, answer, level in rows:
                row = {
                    "data_source": f"arithmetic-{split}",
                    "prompt": chat(expr),
                    "reward_model": {"ground_truth": answer},
                    "extra_info": {"expression": expr, "level": level, "split": split},
                }
                f.write(json.dumps(row) + "\n")
    print(f"{out}: {len(held)} held-out rows first, then {len(train)} train rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
