"""Final-answer extraction and the zero-score rules, as pure string functions (no sympy).

The rules, applied in this order; the first that fires decides (see `check_answer`):

1. ``echoed_prompt``: a ``prompt`` was given and either the response is nothing but copies of
   it (whitespace collapsed), or the last box lies inside a verbatim copy of it (the "answer"
   was copied from the question, e.g. from a worked example in a few-shot prompt).
2. ``no_answer``: no ``\\boxed{...}`` / ``\\fbox{...}`` with a closing brace, or the last box
   the response opens never closes (cut off while writing it: "\\boxed{1} then \\boxed{2"
   has no answer, the earlier box is a draft it moved on from). Unboxed answers ("The answer
   is 5") score 0: an explicit marker is required.
3. ``empty_answer``: the last box is empty or whitespace (``\\boxed{}``, ``\\boxed{ }``).
4. ``competing_answers``: either
   a. the final line (the line on which the last box starts) holds two or more boxes whose
      contents differ once whitespace is removed ("\\boxed{3} or \\boxed{5}"); or
   b. the last box offers alternatives joined by a disjunction word ("or", "and/or", "\\lor",
      "either") while the reference answer is single-valued (it has no such word and no comma
      outside brackets). A multi-valued reference ("3, 5") lets the box say "3 or 5" and leaves
      the set comparison to math-verify.
   Boxes on earlier lines are drafts: only the last box is the answer ("\\boxed{3}... wait,
   \\boxed{5}" answers 5).

Known limitation: an answer split over several boxes ("x=\\boxed{3}, y=\\boxed{5}") counts as
competing; the reference answer must be put in one box.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ZeroReason = Literal["echoed_prompt", "no_answer", "empty_answer", "competing_answers"]

# `\boxed{` or `\fbox{`, not `\boxedfoo{`. Whitespace between the command and the brace is legal
# LaTeX and models do emit it.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Alternatives inside one box. `\text{ or }` is caught by the bare word, since the text is
# scanned with the braces still in it.
_DISJUNCTION = re.compile(r"\bor\b|\band/or\b|\beither\b|\\lor\b", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Box:
    """One boxed span: `start` is the offset of the backslash, `end` one past the closing
    brace, `content` the text between the braces."""

    start: int
    end: int
    content: str


def find_boxes(text: str) -> list[Box]:
    """Every closed box of `text` (`scan_boxes`)."""
    return scan_boxes(text)[0]


def scan_boxes(text: str) -> tuple[list[Box], int]:
    """Every closed ``\\boxed{...}`` / ``\\fbox{...}`` in `text`, in order, nested braces
    balanced. A box whose braces never close is skipped (it is a truncated answer, not an
    answer). Boxes nested inside another box are part of the outer box's content.

    One pass over the text with a stack of open braces: linear in len(text), however many
    unclosed boxes it holds (matching each box from its own brace was quadratic: 140 KB of
    unclosed `\\boxed{` took 136 s). Escaped braces (`\\{`) do not count, so
    `\\boxed{\\{1, 2\\}}` keeps its set braces.

    Returns the boxes and the start of the last box opening whose braces never close (-1 when
    every box closes)."""
    # The brace of each box opening -> where its command starts. That brace is never
    # consumed as an escaped character below: the regex puts a letter or a space before it.
    opens = {m.end() - 1: m.start() for m in _BOX_OPEN.finditer(text)}
    if not opens:
        return [], -1
    closed: list[Box] = []
    stack: list[int] = []
    i, n = min(opens), len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            o = stack.pop()
            if o in opens:
                closed.append(Box(opens[o], i + 1, text[o + 1 : i]))
        i += 1
    # Closed boxes nest or are disjoint; keep the outermost ones, in order.
    boxes: list[Box] = []
    for b in sorted(closed, key=lambda b: b.start):
        if not boxes or b.start >= boxes[-1].end:
            boxes.append(b)
    # Braces still open at the end: the box openings among them never closed.
    unclosed = max((opens[o] for o in stack if o in opens), default=-1)
    return boxes, unclosed


def final_box(boxes: list[Box], unclosed: int) -> Box | None:
    """The answer box: the last closed box, unless a box opened after it never closes (a
    response cut off inside its final box has no answer). An unclosed opening cannot lie
    inside a closed box (the braces between a box's own are balanced), so comparing starts
    is enough."""
    if not boxes or unclosed > boxes[-1].start:
        return None
    return boxes[-1]


def last_boxed(text: str) -> str | None:
    """Content of the last box `text` opens; None when there is no box or that last box never
    closes ("\\boxed{1} then \\boxed{2" gives None). Nested boxes belong to their outer box.
    The one copy: the reward (`check_answer`) and the benchmark loader
    (`eval.benchmarks.parse_record`) both read answers with this rule."""
    box = final_box(*scan_boxes(text))
    return box.content if box else None


def _collapse(s: str) -> str:
    return _WHITESPACE.sub(" ", s).strip()


def _top_level_has_comma(s: str) -> bool:
    """A comma outside (), [], {} — the reference lists several values. Escaped braces (the
    LaTeX set braces) are not brackets of their own here: `\\{1, 2\\}` is a list of values."""
    depth = 0
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth <= 0:
            return True
        i += 1
    return False


def is_multi_valued(ground_truth: str) -> bool:
    """The reference answer names several values ("3, 5", "2 or 3", "\\{1, 2\\}")."""
    gt = ground_truth.replace("\\{", "").replace("\\}", "")
    return bool(_DISJUNCTION.search(gt)) or _top_level_has_comma(gt)


def is_echo(response: str, prompt: str, boxes: list[Box]) -> bool:
    """Rule 1 of the module docstring."""
    p = prompt.strip()
    if not p:
        return False
    collapsed_p = _collapse(p)
    if not _collapse(_collapse(response).replace(collapsed_p, "")):
        return True
    if boxes:
        last = boxes[-1]
        start = response.find(p)
        while start != -1:
            if start <= last.start and last.end <= start + len(p):
                return True
            start = response.find(p, start + 1)
    return False


@dataclass(frozen=True)
class AnswerCheck:
    """Outcome of the string rules: either a zero reason, or the answer to verify."""

    answer: str | None
    """The last box's content, stripped, when no zero rule fired; None otherwise."""
    zero_reason: ZeroReason | None
    """Which rule scored the response 0, or None when `answer` must go to math-verify."""


# Only the end of a response is scanned for boxes: the answer is at the end, and a runaway
# generation must not cost the trainer's rank 0 (which scores outside the workers' deadline)
# more than a bounded, linear pass. 64K characters is ~16K tokens of text.
MAX_SCAN_CHARS = 65_536


def check_answer(response: str, ground_truth: str, prompt: str | None = None) -> AnswerCheck:
    """Apply the zero rules of the module docstring; pure, linear in the response and
    bounded (boxes are looked for in its last `MAX_SCAN_CHARS` characters)."""
    offset = max(0, len(response) - MAX_SCAN_CHARS)
    found, unclosed = scan_boxes(response[offset:])
    boxes = [Box(b.start + offset, b.end + offset, b.content) for b in found]
    if prompt is not None and is_echo(response, prompt, boxes):
        return AnswerCheck(None, "echoed_prompt")
    if final_box(found, unclosed) is None:
        return AnswerCheck(None, "no_answer")
    last = boxes[-1]
    if not last.content.strip():
        return AnswerCheck(None, "empty_answer")
    line_start = response.rfind("\n", 0, last.start) + 1
    final_line = {_WHITESPACE.sub("", b.content) for b in boxes if b.start >= line_start}
    if len(final_line) > 1:
        return AnswerCheck(None, "competing_answers")
    if _DISJUNCTION.search(last.content) and not is_multi_valued(ground_truth):
        return AnswerCheck(None, "competing_answers")
    return AnswerCheck(last.content.strip(), None)
