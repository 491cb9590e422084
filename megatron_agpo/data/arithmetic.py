"""A deterministic synthetic arithmetic task, for tests and the tiny default run.

Prompts are bare expressions, "12+7*3=", and the expected response is "\\boxed{33}": short, so a
tiny model with a character-level tokenizer and a short context can learn it. Answers are
exact integers computed from the generated operands with the usual precedence (* before + and
-, left to right); nothing is ever evaluated from text.

Train and eval never overlap: an expression's split is a hash of its text, so the same
expression lands in the same split whatever the seed, level or count.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from megatron_agpo.data.records import PromptExample

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Level:
    """One difficulty level."""

    num_ops: int
    """Binary operations in the expression (operands = num_ops + 1)."""
    ops: str
    """Operators drawn from."""
    max_operand: int
    """Operands are drawn from 0..max_operand."""


LEVELS: dict[int, Level] = {
    1: Level(1, "+", 9),  # a+b, single digits: 100 distinct problems
    2: Level(1, "+-", 99),
    3: Level(2, "+-*", 20),
    4: Level(3, "+-*", 99),
    5: Level(4, "+-*", 999),
}


@dataclass(frozen=True)
class ArithmeticConfig:
    """The synthetic arithmetic task."""

    levels: tuple[int, ...] = (1, 2, 3)
    """Difficulty levels (keys of LEVELS), drawn round-robin; a level whose expressions run
    out (level 1 has 100) leaves the rest to the others."""
    seed: int = 0
    """Seed of the generator; each split draws from its own stream."""
    eval_fraction: float = 0.1
    """Share of the expression space held out for eval (by hash of the expression)."""
    num_train: int = 1000
    """Problems in the train split."""
    num_eval: int = 100
    """Problems in the eval split."""

    def __post_init__(self) -> None:
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if not self.levels or bad:
            raise ValueError(
                f"ArithmeticConfig.levels must be a non-empty subset of {sorted(LEVELS)}, "
                f"got {self.levels}"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(
                f"ArithmeticConfig.eval_fraction must be in (0, 1), got {self.eval_fraction}"
            )


def evaluate(operands: list[int], ops: list[str]) -> int:
    """Value of operands[0] ops[0] operands[1] ... with * before + and -."""
    # Fold products into the current term, then sum the signed terms.
    terms: list[int] = []
    signs: list[int] = [1]
    term = operands[0]
    for op, x in zip(ops, operands[1:], strict=True):
        if op == "*":
            term *= x
        else:
            terms.append(term)
            signs.append(1 if op == "+" else -1)
            term = x
    terms.append(term)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def render(operands: list[int], ops: list[str]) -> str:
    return str(operands[0]) + "".join(op + str(x) for op, x in zip(ops, operands[1:], strict=True))


def split_of(expression: str, eval_fraction: float) -> Split:
    """Hash split: a stable function of the expression text alone."""
    h = int.from_bytes(hashlib.blake2b(expression.encode(), digest_size=8).digest(), "big")
    return "eval" if h % 1_000_000 < eval_fraction * 1_000_000 else "train"


def random_problem(rng: random.Random, level: int) -> tuple[str, int]:
    """(expression, answer) at `level`."""
    spec = LEVELS[level]
    operands = [rng.randint(0, spec.max_operand) for _ in range(spec.num_ops + 1)]
    ops = [rng.choice(spec.ops) for _ in range(spec.num_ops)]
    if level == 2 and ops[0] == "-" and operands[0] < operands[1]:
        # Level 2 stays non-negative; negative answers start at level 3.
        operands[0], operands[1] = operands[1], operands[0]
    return render(operands, ops), evaluate(operands, ops)


def generate_arithmetic(cfg: ArithmeticConfig, split: Split) -> list[PromptExample]:
    """`cfg.num_train` or `cfg.num_eval` distinct problems of `split`, deterministic in cfg."""
    n = cfg.num_train if split == "train" else cfg.num_eval
    # A string seed is hashed with SHA-512 by `random`, stable across Python versions.
    rng = random.Random(f"arithmetic:{cfg.seed}:{split}")
    seen: set[str] = set()
    out: list[PromptExample] = []
    attempts = 0
    max_attempts = 200 * n + 10_000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"only {len(out)} distinct {split} problems found for levels {cfg.levels} "
                f"(asked for {n}); add harder levels or ask for fewer"
            )
        # Round-robin over attempts, not over accepted problems: once a small level (level 1
        # has 100 expressions) is used up, the others keep filling the split.
        level = cfg.levels[attempts % len(cfg.levels)]
        expr, answer = random_problem(rng, level)
        if expr in seen or split_of(expr, cfg.eval_fraction) != split:
            continue
        seen.add(expr)
        prompt = expr + "="
        out.append(
            PromptExample(
                index=len(out),
                messages=({"role": "user", "content": prompt},),
                problem=prompt,
                ground_truth=str(answer),
                source=f"arithmetic-{split}",
                metadata={"level": level},
            )
        )
    return out
