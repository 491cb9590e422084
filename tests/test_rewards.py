"""Math reward: the zero rules, math-verify equivalences, the deadline, and thread safety.

Expected scores are written out by hand (the independent reference); workers are real
processes, so the module shares one reward across the tests that do not need their own.
"""

from __future__ import annotations

import math
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_agpo.registry import require_valid
from megatron_agpo.rewards import (
    DeadlinePool,
    MathReward,
    Reward,
    RewardConfig,
    WorkerError,
    check_answer,
    find_boxes,
    last_boxed,
)

# Workers start in ~1 s; a loaded 2-core machine may make that several.
MARGIN_S = 1.5


def slow_verify(answer: str, ground_truth: str) -> bool:
    """Test hook run inside the workers: 'hang' never returns, anything else compares text."""
    if answer == "hang":
        time.sleep(3600)
    return answer.strip() == ground_truth.strip()


def crash_or_echo(x: str) -> str:
    if x == "crash":
        os._exit(3)  # a worker that dies without answering (segfault, OOM kill)
    if x == "raise":
        raise ValueError("bad input")
    return x


@pytest.fixture(scope="module")
def reward():
    with MathReward(RewardConfig(num_workers=2, timeout_s=20.0)) as r:
        yield r


# ---- pure string rules (no workers) ----


def test_find_boxes_nested_and_escaped_braces():
    text = r"a \boxed{\frac{1}{2}} b \fbox{x} c \boxed{\{1, 2\}} d \boxed {7}"
    assert [b.content for b in find_boxes(text)] == [r"\frac{1}{2}", "x", r"\{1, 2\}", "7"]
    assert last_boxed(r"\boxed{\boxed{3}}") == r"\boxed{3}"
    assert last_boxed(r"\boxed{5} then \boxed{6") is None  # cut off inside its last box
    assert last_boxed(r"\boxedx{5}") is None
    assert last_boxed("no box") is None


def _reference_find_boxes(text: str) -> list[tuple[int, int, str]]:
    """The earlier quadratic algorithm, kept as the reference: each box's brace is matched
    by its own scan from that brace (escapes skipped); a closed box hides the ones inside."""
    import re

    out, pos = [], 0
    while (m := re.compile(r"\\(?:boxed|fbox)\s*\{").search(text, pos)) is not None:
        depth, i, close = 0, m.end() - 1, None
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            if c == "}" and depth == 0:
                close = i
                break
            i += 1
        if close is None:
            pos = m.end()
            continue
        out.append((m.start(), close + 1, text[m.end() : close]))
        pos = close + 1
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["\\boxed{", "\\fbox {", "{", "}", "\\", "\\{", "a", " ", "\n"]),
        max_size=40,
    )
)
def test_find_boxes_matches_reference_algorithm(tokens):
    text = "".join(tokens)
    assert [(b.start, b.end, b.content) for b in find_boxes(text)] == _reference_find_boxes(text)


def test_answer_scan_is_linear_and_bounded():
    # 140 KB of unclosed boxes took 136 s with the per-box scan (quadratic).
    runaway = "\\boxed{" * 20_000
    t0 = time.perf_counter()
    assert check_answer(runaway, "5").zero_reason == "no_answer"
    assert check_answer(runaway + "\\boxed{5}", "5").answer == "5"
    assert time.perf_counter() - t0 < 0.5
    # Bounded: only the last MAX_SCAN_CHARS characters are scanned, so a box at the end of a
    # megabyte of text is found and one before that tail is not.
    from megatron_agpo.rewards.answer import MAX_SCAN_CHARS

    filler = "x" * (MAX_SCAN_CHARS + 10)
    assert check_answer("\\boxed{5}" + filler, "5").zero_reason == "no_answer"
    assert check_answer("y" * 1_000_000 + "\\boxed{7}", "7").answer == "7"


_balanced = st.recursive(
    st.text(alphabet="ab1+ ", max_size=4),
    lambda inner: st.builds(lambda a, b: "{" + a + "}" + b, inner, inner),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(_balanced, st.text(alphabet="xyz \n", max_size=5))
def test_last_box_content_roundtrip(content, prefix):
    assert last_boxed(prefix + r"\boxed{" + content + "}") == content


@pytest.mark.parametrize(
    "response, ground_truth, reason",
    [
        ("The answer is 5.", "5", "no_answer"),
        (r"\boxed{5", "5", "no_answer"),
        (r"so \boxed{}", "5", "empty_answer"),
        (r"so \boxed{  }", "5", "empty_answer"),
        (r"\boxed{3 or 5}", "3", "competing_answers"),
        (r"\boxed{3 \text{ or } 5}", "3", "competing_answers"),
        (r"\boxed{either 3 and/or 5}", "3", "competing_answers"),
        (r"x is \boxed{3} or \boxed{5}", "3", "competing_answers"),
        ("draft \\boxed{4}\nso \\boxed{3}, \\boxed{5}", "3", "competing_answers"),
    ],
)
def test_zero_rules(response, ground_truth, reason):
    assert check_answer(response, ground_truth).zero_reason == reason


def test_rules_that_do_not_fire():
    # A draft on an earlier line is not a competing answer; the last box answers.
    assert check_answer("\\boxed{3}\nwait: \\boxed{5}", "5").answer == "5"
    # The same answer boxed twice on the final line is one answer.
    assert check_answer(r"\boxed{5} so \boxed{ 5 }", "5").answer == "5"
    # A multi-valued reference lets the box list alternatives (math-verify compares the sets).
    assert check_answer(r"\boxed{3 \text{ or } 5}", "3, 5").answer == r"3 \text{ or } 5"
    # Words that merely contain "or" are not disjunctions.
    assert check_answer(r"\boxed{\text{north}}", "north").zero_reason is None


PROMPT = r"Example: 1+1=\boxed{2}. Now compute 1+1+0."


def test_echo_rule():
    assert check_answer(PROMPT, "2", prompt=PROMPT).zero_reason == "echoed_prompt"
    assert check_answer(PROMPT + "\n " + PROMPT, "2", prompt=PROMPT).zero_reason == (
        "echoed_prompt"
    )
    # Whitespace differences do not hide an echo.
    assert check_answer("  " + PROMPT.replace(" ", "\n"), "2", prompt=PROMPT).zero_reason == (
        "echoed_prompt"
    )
    # Repeating the question and then answering is fine.
    assert check_answer(PROMPT + "\n1+1+0 = \\boxed{2}", "2", prompt=PROMPT).answer == "2"
    # Without the prompt the check cannot run: the copied box would be taken as the answer.
    assert check_answer(PROMPT, "2").answer == "2"


# ---- through the workers ----


@pytest.mark.dist  # reward worker processes
@pytest.mark.parametrize(
    "response, ground_truth, expected",
    [
        (r"so \boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt2}{2}", 1.0),
        (r"The answer is $\boxed{33}$.", "33", 1.0),
        (r"\fbox{12}", "12", 1.0),
        (r"\boxed {7}", "7", 1.0),
        (r"\boxed{(1, 2)}", "(1,2)", 1.0),
        (r"\boxed{\{1,2\}}", r"\{1,2\}", 1.0),
        (r"\boxed{3 \text{ or } 5}", "3, 5", 1.0),
        ("\\boxed{3}\nhmm, no: \\boxed{5}", "5", 1.0),
        ("\\boxed{3}\nhmm, no: \\boxed{5}", "3", 0.0),
        (r"\boxed{-12}", "-12", 1.0),
        (r"\boxed{0.51}", r"\frac12", 0.0),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        (r"\boxed{34}", "33", 0.0),
        (r"\boxed{3 or 5}", "3", 0.0),
        (r"\boxed{}", "3", 0.0),
        ("3", "3", 0.0),
    ],
)
def test_math_reward_scores(reward, response, ground_truth, expected):
    assert reward(response, ground_truth) == expected


@pytest.mark.dist  # reward worker processes
def test_echo_through_reward(reward):
    assert reward(PROMPT, "2", prompt=PROMPT) == 0.0
    assert reward(PROMPT + " so \\boxed{2}", "2", prompt=PROMPT) == 1.0


@pytest.mark.dist  # reward worker processes
def test_stats_count_outcomes():
    with MathReward(RewardConfig(num_workers=1, timeout_s=20.0)) as r:
        assert isinstance(r, Reward)
        scores = r.score_batch(
            [r"\boxed{2}", r"\boxed{3}", "2", r"\boxed{}", r"\boxed{1 or 2}", r"\boxed{2}"],
            ["2", "2", "2", "2", "2", ""],
        )
        assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        s = r.stats()
    assert s.calls == 6 and s.timeouts == 0 and s.errors == 0
    assert s.outcomes == {
        "correct": 1,
        "incorrect": 1,
        "no_answer": 1,
        "empty_answer": 1,
        "competing_answers": 1,
        "unparsable_ground_truth": 1,
    }
    assert s.as_metrics()["reward/correct"] == 1.0


@pytest.mark.dist  # reward worker processes
def test_deadline_kills_and_replaces_worker():
    cfg = RewardConfig(num_workers=1, timeout_s=1.0, retries=0)
    with MathReward(cfg, verify_fn=slow_verify) as r:
        assert r(r"\boxed{4}", "4") == 1.0  # the worker is up: startup is not in the deadline
        t0 = time.monotonic()
        assert math.isnan(r(r"\boxed{hang}", "4"))  # unscored, not 0
        elapsed = time.monotonic() - t0
        assert cfg.timeout_s <= elapsed < cfg.timeout_s + MARGIN_S
        assert r.stats().timeouts == 1 and r.stats().outcomes["timeout"] == 1
        assert r.worker_restarts == 1
        # The replacement works.
        assert r(r"\boxed{4}", "4") == 1.0
        assert r(r"\boxed{5}", "4") == 0.0


@pytest.mark.dist  # reward worker processes
def test_deadline_on_real_sympy_blowup():
    """A real input on which math-verify does not return (sympy evaluates a power tower)."""
    cfg = RewardConfig(num_workers=1, timeout_s=1.0, retries=0)
    with MathReward(cfg) as r:
        assert r(r"\boxed{1}", "1") == 1.0
        t0 = time.monotonic()
        assert math.isnan(r(r"\boxed{9^{9^{9^{9^{9}}}}}", "7"))
        assert time.monotonic() - t0 < cfg.timeout_s + MARGIN_S
        assert r.stats().timeouts == 1
        assert r(r"\boxed{0.25}", r"\frac14") == 1.0


@pytest.mark.dist  # reward worker processes
def test_deadline_from_a_non_main_thread():
    """math-verify's own SIGALRM timeout cannot work off the main thread; ours does."""
    cfg = RewardConfig(num_workers=2, timeout_s=1.0, retries=0, max_unscored_fraction=0.5)
    with MathReward(cfg, verify_fn=slow_verify) as r:
        r.score_batch([r"\boxed{1}"] * 2, ["1"] * 2)  # start both workers
        out: dict[str, float] = {}

        def run():
            t0 = time.monotonic()
            out["score"] = r(r"\boxed{hang}", "1")
            out["elapsed"] = time.monotonic() - t0

        t = threading.Thread(target=run)
        t.start()
        t.join(timeout=cfg.timeout_s + 10)
        assert math.isnan(out["score"]) and out["elapsed"] < cfg.timeout_s + MARGIN_S
        # A batch with a hang in the middle keeps its order and its other answers.
        scores = r.score_batch([r"\boxed{1}", r"\boxed{hang}", r"\boxed{2}"], ["1", "1", "2"])
        assert scores[0] == scores[2] == 1.0 and math.isnan(scores[1])
        assert r.stats().timeouts == 2


@pytest.mark.dist  # reward worker processes
def test_many_threads(reward):
    cases = [
        (r"\boxed{0.5}", r"\frac12", 1.0),
        (r"\boxed{2}", "3", 0.0),
        (r"\boxed{\frac{6}{4}}", "1.5", 1.0),
        ("no box", "1", 0.0),
    ]
    results: list[list[float]] = []
    lock = threading.Lock()

    def worker():
        got = [reward(resp, gt) for resp, gt, _ in cases]
        with lock:
            results.append(got)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [[c[2] for c in cases]] * 6


@pytest.mark.dist  # reward worker processes
def test_pool_worker_death_and_errors():
    with DeadlinePool(crash_or_echo, num_workers=1, timeout_s=10.0) as pool:
        assert pool.call("a") == "a"
        with pytest.raises(WorkerError, match="died"):
            pool.call("crash")
        with pytest.raises(WorkerError, match="ValueError: bad input"):
            pool.call("raise")
        assert pool.call("b") == "b"
        c = pool.counters
    assert (c.calls, c.errors, c.restarts, c.timeouts) == (2, 2, 1, 0)


@pytest.mark.dist  # reward worker processes
def test_close_stops_workers():
    pool = DeadlinePool(crash_or_echo, num_workers=2, timeout_s=10.0)
    pool.call("a")
    procs = [w.proc for w in pool._live]
    pool.close()
    assert procs and not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        pool.call("a")


def test_config_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        require_valid(RewardConfig(timeout_s=0), "reward.math.")
    with pytest.raises(ValueError, match="num_workers"):
        require_valid(RewardConfig(num_workers=0), "reward.math.")


@pytest.mark.dist  # reward worker processes
def test_module_level_functions():
    from megatron_agpo.rewards import default_math_reward, math_reward, score_batch

    # The default reward is shared by the whole process: count this test's calls only.
    before = default_math_reward().stats().calls
    assert math_reward(r"\boxed{\frac{2}{4}}", "0.5") == 1.0
    assert score_batch([r"\boxed{1}", r"\boxed{2}"], ["1", "1"]) == [1.0, 0.0]
    assert default_math_reward().stats().calls == before + 3
