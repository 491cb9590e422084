"""One `last_boxed` for the reward and the benchmark loader (issue 25).

The rule: the answer is the content of the last box the text opens; when that box never
closes (a response cut off while writing it), there is no answer, even if an earlier box
closed. An earlier box is a draft the text moved on from (`rewards/answer.py`'s module
docstring), and the standard MATH extractor (`last_boxed_only_string`: rfind of the last
box) also gives None there.
"""

import pytest

from megatron_agpo.eval import benchmarks
from megatron_agpo.eval.benchmarks import parse_record
from megatron_agpo.rewards.answer import check_answer, last_boxed


def reference_last_boxed(text: str) -> str | None:
    """Independent reference: the last `\\boxed{`/`\\fbox{` opening (whitespace allowed before
    the brace) that is not nested in a closed box, matched by counting unescaped braces."""
    import re

    opens = [(m.start(), m.end()) for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]

    def close(brace_end: int) -> int | None:  # index of the matching "}" or None
        depth, i = 1, brace_end
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(c, 0)
            if depth == 0:
                return i
            i += 1
        return None

    spans = [(s, e, close(e)) for s, e in opens]
    # Outermost boxes only: drop the openings inside an earlier closed box.
    top = [sp for sp in spans if not any(o[2] is not None and o[0] < sp[0] < o[2] for o in spans)]
    if not top:
        return None
    s, e, c = top[-1]
    return None if c is None else text[e:c]


CASES = [
    (r"\boxed{1} then \boxed{2", None),  # the last box is unterminated: no answer
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"a \boxed{1} b \boxed{\frac{1}{\sqrt{2}}} c", r"\frac{1}{\sqrt{2}}"),
    (r"\fbox{7}", "7"),
    (r"\boxed {7}", "7"),
    ("no box", None),
    (r"\boxed{unclosed", None),
    (r"\boxed{\boxed{3}}", r"\boxed{3}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxedx{5}", None),
    (r"\boxed 5 and {x}", None),  # no brace right after the command: not a box
    ("\\boxed{" * 50 + r"\boxed{5}", "5"),  # unclosed openings before a closed last box
]


@pytest.mark.parametrize("text, expect", CASES)
def test_last_boxed_rule(text, expect):
    assert reference_last_boxed(text) == expect  # the reference states the rule
    assert last_boxed(text) == expect


def test_one_copy_for_both_callers():
    assert benchmarks.last_boxed is last_boxed


def test_reward_sees_no_answer_in_an_unterminated_last_box():
    check = check_answer("I think \\boxed{1}.\nWait, no: \\boxed{2", "1")
    assert check.answer is None and check.zero_reason == "no_answer"
    assert check_answer("I think \\boxed{1}.\nWait, no: \\boxed{2}", "2").answer == "2"


def test_benchmark_loader_uses_the_same_rule():
    row = {"problem": "p", "solution": r"so \boxed{1} then \boxed{2"}
    with pytest.raises(ValueError, match="missing field 'answer'"):
        parse_record("minerva", row, 0)
    row = {"problem": "p", "solution": r"\boxed 5, see {x}"}  # no box: not "x"
    with pytest.raises(ValueError, match="missing field 'answer'"):
        parse_record("minerva", row, 0)
    row = {"problem": "p", "solution": r"draft \boxed{1}, final \boxed {\frac{1}{2}}."}
    assert parse_record("minerva", row, 0).answer == r"\frac{1}{2}"
