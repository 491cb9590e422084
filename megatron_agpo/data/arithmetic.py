"""A deterministic synthetic arithmetic task, for tests and the tiny default run.

Prompts are bare expressions, "12+7*3=", and the expected response is "\\boxed{33}": short, so a
tiny model with a character-level tokenizer and a short context can learn it. Answers are
exact integers computed from the generated operands with the usual precedence (* before + and
-, left to right); nothing is ever evaluated from text.

Train and eval never overlap: an expression's split is a hash of its text, so the same
expression lands in the same split whatever the seed, level or count. The tiny policy's
supervised warm start draws from the train side of the same hash, so held-out expressions
are new to it too.

Levels 1-5 are the original task (the default run uses level 1). Levels 6-10 are the graded
task (`GRADED_LEVELS`, version `GRADED_VERSION`): two-operand addition and subtraction graded
by operand digits and by the number of carries / borrows of column arithmetic, from
"43+5" (none) to "68+57" (two carries). Its held-out set is pinned by a hash in
tests/test_arithmetic_graded.py: changing the generator changes the version.
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
    digits: tuple[int, ...] | None = None
    """Graded levels: digits of each operand (1: 0..9, 2: 10..99), instead of max_operand."""
    carries: tuple[int, ...] | None = None
    """Graded levels: the allowed numbers of carries (+) or borrows (-) of column arithmetic;
    a subtraction keeps its larger operand first (answers stay >= 0)."""


LEVELS: dict[int, Level] = {
    1: Level(1, "+", 9),  # a+b, single digits: 100 distinct problems
    2: Level(1, "+-", 99),
    3: Level(2, "+-*", 20),
    4: Level(3, "+-*", 99),
    5: Level(4, "+-*", 999),
    # The graded task (version GRADED_VERSION): 2-digit +- 1-digit, then 2-digit +- 2-digit,
    # by carries / borrows.
    6: Level(1, "+-", 99, digits=(2, 1), carries=(0,)),  # 43+5, 47-3
    7: Level(1, "+-", 99, digits=(2, 1), carries=(1,)),  # 47+5, 43-8
    8: Level(1, "+-", 99, digits=(2, 2), carries=(0,)),  # 43+25, 68-25
    9: Level(1, "+-", 99, digits=(2, 2), carries=(1,)),  # 47+25, 81+42, 63-28
    10: Level(1, "+", 99, digits=(2, 2), carries=(2,)),  # 68+57: two carries
}

GRADED_LEVELS: tuple[int, ...] = (6, 7, 8, 9, 10)
"""The graded task's levels, easiest first."""
GRADED_VERSION = 1
"""Version of the graded task: bumped whenever its problems change."""
GRADED_NUM_EVAL = 400
"""Size of the graded task's pinned held-out set (seed 0). A smaller data.num_eval gives a
prefix of it."""


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


def column_carries(a: int, b: int, op: str) -> int:
    """Carries of a + b, or borrows of a - b (a >= b >= 0), in base-10 column arithmetic."""
    if op == "-" and a < b:
        raise ValueError(f"column_carries: {a}-{b} is negative")
    count, carry = 0, 0
    while a or b:
        da, db = a % 10, b % 10
        if op == "+":
            carry = 1 if da + db + carry >= 10 else 0
        else:
            carry = 1 if da - db - carry < 0 else 0
        count += carry
        a, b = a // 10, b // 10
    return count


def _graded_problem(rng: random.Random, spec: Level) -> tuple[str, int]:
    # Rejection sampling within the level: every draw comes from the same seeded stream, so
    # the problems are a pure function of (seed, split, levels).
    while True:
        a, b = (rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1) for d in spec.digits)
        op = rng.choice(spec.ops)
        if op == "-" and a < b:
            a, b = b, a
        if column_carries(a, b, op) in spec.carries:
            return render([a, b], [op]), evaluate([a, b], [op])


def random_problem(rng: random.Random, level: int) -> tuple[str, int]:
    """(expression, answer) at `level`."""
    spec = LEVELS[level]
    if spec.digits is not None:
        return _graded_problem(rng, spec)
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
