"""Math answer reward: the last boxed answer, checked against the reference by math-verify,
in worker processes under a deadline.

Scores are 1.0 (correct) or 0.0, or NaN for an answer that could not be scored: its
verification overran the deadline or its worker died (an OOM kill) on every try. A wrong
answer and a failed verifier are never confused: the trainer drops the groups of unscored
answers (and counts them), and a batch with too many of them stops the run. The string
rules that score 0 before any verification (no box, empty box, competing answers, echoed
prompt) are in `answer.py`; what is left goes to a worker that parses both sides with
math-verify and compares them (so "0.5" matches "\\frac{1}{2}", and "\\dfrac12" matches
"1/2").
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from megatron_agpo.registry import require_valid
from megatron_agpo.rewards.answer import check_answer
from megatron_agpo.rewards.base import RewardStats, RewardUnavailable
from megatron_agpo.rewards.pool import CallTimeout, DeadlinePool, WorkerError
from megatron_agpo.rewards.registry import register_reward

logger = logging.getLogger(__name__)

VerifyFn = Callable[[str, str], "bool | None"]


@dataclass  # not frozen: Hydra cannot apply reward.math.* overrides to a frozen node
class RewardConfig:
    """How the math reward verifies answers."""

    timeout_s: float = 5.0
    """Deadline for one verification (parse + compare) in a worker. On overrun the worker is
    killed and replaced, and the answer is verified again (`retries`)."""
    retries: int = 2
    """How many more times an answer is verified, each on a fresh worker, after its worker
    died or overran the deadline. An answer that fails every try scores NaN (unscored: the
    trainer drops its group and counts it in reward/unscored)."""
    max_unscored_fraction: float = 0.1
    """The run stops (an error naming the counts) when more than this fraction of one batch's
    answers could not be scored: the verifier is failing, not the answers."""
    num_workers: int = 2
    """Worker processes, and so the most verifications running at once."""
    start_method: str = "spawn"  # str, not Literal: OmegaConf rejects Literal
    """How workers start: spawn (safe beside threads, CUDA and vLLM) or forkserver."""
    startup_timeout_s: float = 120.0
    """How long a new worker may take to import math-verify before it counts as failed."""
    float_rounding: int = 6
    """math-verify: decimal places that floats are rounded to before comparing."""
    numeric_precision: int = 15
    """math-verify: significant digits used when evaluating expressions numerically."""

    def problems(self, prefix: str = "reward.math.") -> list[str]:
        """This section's problems, one line each naming the key."""
        out = []
        checks = {
            "timeout_s": (self.timeout_s > 0, "must be > 0"),
            "num_workers": (self.num_workers >= 1, "must be >= 1"),
            "retries": (0 <= self.retries <= 10, "must be in [0, 10]"),
            "max_unscored_fraction": (
                0.0 <= self.max_unscored_fraction <= 1.0,
                "must be in [0, 1]",
            ),
            "start_method": (self.start_method in ("spawn", "forkserver"), "spawn or forkserver"),
            "startup_timeout_s": (self.startup_timeout_s > 0, "must be > 0"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                out.append(f"{prefix}{name}={getattr(self, name)!r}: {rule}")
        return out


def _as_latex(text: str) -> str:
    """Give math-verify an explicit anchor: a bare "1/2" or "\\frac{1}{2}" is boxed, so it is
    read as one expression and not searched for the last number in it."""
    if "\\boxed" in text or "\\fbox" in text or "$" in text:
        return text
    return "\\boxed{" + text + "}"


def verify_boxed_answer(
    answer: str, ground_truth: str, float_rounding: int = 6, numeric_precision: int = 15
) -> bool | None:
    """Runs in a worker: True when `answer` (a box's content) equals `ground_truth` under
    math-verify, None when the ground truth itself cannot be parsed (a data problem, counted
    apart from wrong answers)."""
    from math_verify import parse, verify

    # math-verify's own timeouts are SIGALRM-based; the pool's deadline replaces them.
    gold = parse(_as_latex(ground_truth), parsing_timeout=None)
    if not gold:
        return None
    pred = parse("\\boxed{" + answer + "}", parsing_timeout=None)
    if not pred:
        return False
    return bool(
        verify(
            gold,
            pred,
            float_rounding=float_rounding,
            numeric_precision=numeric_precision,
            timeout_seconds=None,
        )
    )


def _warmup() -> None:
    """Import sympy and math-verify's grammars before the first deadline starts."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # one warning per worker is noise
    from math_verify import parse

    parse("\\boxed{1}", parsing_timeout=None)


class MathReward:
    """`Reward` for math answers. Thread-safe; owns worker processes, so close it (or use it as
    a context manager).

    `verify_fn` is what the workers run, `(answer, ground_truth) -> bool | None`; it must be
    picklable (a module-level function). The default is `verify_boxed_answer`; tests inject a
    slow one to exercise the deadline.
    """

    def __init__(self, config: RewardConfig | None = None, verify_fn: VerifyFn | None = None):
        self.config = config or RewardConfig()
        require_valid(self.config, "reward.math.")
        self._custom_fn = verify_fn is not None
        self._pool = DeadlinePool(
            verify_fn or verify_boxed_answer,
            num_workers=self.config.num_workers,
            timeout_s=self.config.timeout_s,
            start_method=self.config.start_method,
            startup_timeout_s=self.config.startup_timeout_s,
            warmup=_warmup,
        )
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()
        self._calls = 0
        self._retries = 0
        self._unscored = 0
        self._threads: ThreadPoolExecutor | None = None

    def _record(self, outcome: str) -> None:
        with self._lock:
            self._calls += 1
            self._outcomes[outcome] += 1

    def __call__(self, response: str, ground_truth: str, *, prompt: str | None = None) -> float:
        check = check_answer(response, ground_truth, prompt)
        if check.zero_reason is not None:
            self._record(check.zero_reason)
            return 0.0
        assert check.answer is not None
        args: tuple = (check.answer, ground_truth)
        if not self._custom_fn:
            args += (self.config.float_rounding, self.config.numeric_precision)
        failure = None
        for attempt in range(self.config.retries + 1):
            try:
                ok = self._pool.call(*args)
                break
            except CallTimeout:
                failure = "timeout"
                why = f"overran {self.config.timeout_s:.1f} s"
            except WorkerError as e:
                failure = "error"
                why = f"failed ({e})"
            with self._lock:
                self._retries += attempt < self.config.retries
            logger.warning(
                "math verification of answer %.80r %s (try %d of %d)%s",
                check.answer, why, attempt + 1, self.config.retries + 1,
                "; retrying on a fresh worker" if attempt < self.config.retries else
                "; the answer is unscored (dropped, counted in reward/unscored)",
            )  # fmt: skip
        else:
            self._record(failure)
            with self._lock:
                self._unscored += 1
            return float("nan")
        if ok is None:
            logger.warning("ground truth %.80r cannot be parsed; scored 0", ground_truth)
            self._record("unparsable_ground_truth")
            return 0.0
        self._record("correct" if ok else "incorrect")
        return 1.0 if ok else 0.0

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        prompts: Sequence[str] | None = None,
    ) -> list[float]:
        """Score in parallel, at most `num_workers` at once; results in input order."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        if prompts is not None and len(prompts) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(prompts)} prompts")
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(
                    self.config.num_workers, thread_name_prefix="math-reward"
                )
            threads = self._threads
        ps = prompts if prompts is not None else [None] * len(responses)
        futures = [
            threads.submit(self, r, g, prompt=p)
            for r, g, p in zip(responses, ground_truths, ps, strict=True)
        ]
        scores = [f.result() for f in futures]
        bad = sum(s != s for s in scores)  # NaN: unscored
        if bad and bad > self.config.max_unscored_fraction * len(scores):
            s = self.stats()
            raise RewardUnavailable(
                f"math reward: {bad} of {len(scores)} answers in this batch could not be scored "
                f"(verifier workers died or overran {self.config.timeout_s} s on each of "
                f"{self.config.retries + 1} tries; so far {s.errors} worker failures, "
                f"{s.timeouts} timeouts), more than reward.math.max_unscored_fraction="
                f"{self.config.max_unscored_fraction}: stopping. Check the machine's memory "
                "(workers killed by the OOM killer) or raise reward.math.timeout_s"
            )
        return scores

    def stats(self) -> RewardStats:
        pool = self._pool.counters
        with self._lock:
            return RewardStats(
                calls=self._calls,
                timeouts=pool.timeouts,
                errors=pool.errors,
                retries=self._retries,
                unscored=self._unscored,
                outcomes=dict(self._outcomes),
            )

    @property
    def worker_restarts(self) -> int:
        """Workers replaced so far (after timeouts or deaths)."""
        return self._pool.counters.restarts

    def close(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=True)
        self._pool.close()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: MathReward | None = None
_default_lock = threading.Lock()


def default_math_reward() -> MathReward:
    """The shared `MathReward` with the default config behind `math_reward` / `score_batch`,
    built on first use and closed at interpreter exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathReward()
            atexit.register(_default.close)
        return _default


def math_reward(response: str, ground_truth: str, *, prompt: str | None = None) -> float:
    """1.0 when the last boxed answer of `response` equals `ground_truth`, else 0.0. See
    `answer.py` for the zero rules; `prompt` (the problem text) enables the echo check."""
    return default_math_reward()(response, ground_truth, prompt=prompt)


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
) -> list[float]:
    """`math_reward` over many responses, in parallel; stats via
    `default_math_reward().stats()`."""
    return default_math_reward().score_batch(responses, ground_truths, prompts=prompts)


@register_reward("math", config=RewardConfig)
def build_math_reward(section) -> MathReward:
    """`reward.name=math`: the math reward with `reward.math`'s settings."""
    return MathReward(section.math)
