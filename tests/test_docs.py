"""The commands and config keys the README and docs/*.md quote still parse against the code.

Every `agpo-train ...` / `python -m megatron_agpo.train ...` command is composed with
`--cfg job` (in-process: the config loader, nothing launched) and every `agpo-plan ...`
command planned (in-process, a few milliseconds); every backticked config key
(`trainer.steps`, `checkpoint.keep_last=2`) must exist in the composed config under some
choice of its config group. A docs command or key that no longer parses fails CI here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONF = REPO / "conf"

TRAIN = re.compile(r"(?:\bagpo-train|-m megatron_agpo\.train)\b(?P<args>.*)")
PLAN = re.compile(r"(?:\bagpo-plan|-m megatron_agpo\.plan)\b(?P<args>.*)")
OVERRIDE = re.compile(r"^[+~]?[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*=")
SPAN = re.compile(r"`([^`\n]+)`")
PLACEHOLDER = re.compile(r"[<>{}$…]|\.\.\.|\bNAME\b|\bVALUE\b", re.IGNORECASE)


def _code_pieces(text: str):
    """(file line, code): the lines of fenced and indented blocks, and inline `spans` (which
    may wrap over lines of a paragraph; joined with spaces)."""
    prose = []
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
            continue
        if fenced or line.startswith("    "):
            yield no, line.strip()
            prose.append("")
        else:
            prose.append(line)
    joined = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", joined):
        if "\n\n" not in m.group(1):
            yield joined.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


def _args(rest: str) -> list[str] | None:
    """The overrides of one command: the text after the program, cut at a comment or a
    shell operator; flags dropped; None when it holds a placeholder."""
    rest = re.split(r"\s#|&&|\|\||[|;)]", rest, maxsplit=1)[0]
    try:
        tokens = shlex.split(rest)
    except ValueError:
        tokens = rest.split()
    if any(PLACEHOLDER.search(t) for t in tokens):
        return None
    multirun = "-m" in tokens or "--multirun" in tokens
    out = []
    for t in tokens:
        if not OVERRIDE.match(t):
            continue  # a flag (--help, --cfg job, -m) or prose
        key, value = t.split("=", 1)
        if multirun and "," in value and not value.startswith("["):
            value = value.split(",")[0]  # the first job of the sweep
        out.append(f"{key}={value}")
    return out


def _commands(pattern: re.Pattern) -> list[tuple[str, list[str]]]:
    found = {}
    for doc in DOCS:
        for no, code in _code_pieces(doc.read_text()):
            m = pattern.search(code)
            if m:
                args = _args(m.group("args"))
                if args is not None:
                    found.setdefault(" ".join(args), (f"{doc.name}:{no}", args))
    return sorted(found.values())


def _run(main, argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse-style exits
            rc = e.code if isinstance(e.code, int) else 2
    return rc or 0, out.getvalue() + err.getvalue()


def _train_main(argv):
    from megatron_agpo import train

    return train.main(argv)


def _plan_main(argv):
    from megatron_agpo.plan.cli import main

    return main(argv)


TRAIN_COMMANDS = _commands(TRAIN)
PLAN_COMMANDS = _commands(PLAN)


def test_the_docs_quote_commands():
    # The extraction itself works: the README's and TRAINING.md's examples are found.
    assert len(TRAIN_COMMANDS) >= 10, TRAIN_COMMANDS
    assert any(a == ["algorithm=grpo"] for _, a in TRAIN_COMMANDS)
    assert PLAN_COMMANDS


@pytest.mark.parametrize("where, args", TRAIN_COMMANDS, ids=[w for w, _ in TRAIN_COMMANDS])
def test_train_command_composes(where, args):
    rc, out = _run(_train_main, [*args, "--cfg", "job"])
    assert rc == 0, f"{where}: agpo-train {' '.join(args)}\n{out[-2000:]}"


@pytest.mark.parametrize("where, args", PLAN_COMMANDS, ids=[w for w, _ in PLAN_COMMANDS])
def test_plan_command_parses(where, args):
    rc, out = _run(_plan_main, [*args, "--json"])
    assert rc in (0, 1), f"{where}: agpo-plan {' '.join(args)}\n{out[-2000:]}"  # 2: bad input


def _flatten(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{prefix}{k}"
            yield from _flatten(v, f"{prefix}{k}.")


@functools.cache
def _known_keys() -> frozenset[str]:
    """Every key of the composed config, under every option of every config group (one group
    switched at a time, the others at their defaults)."""
    choices = [[]] + [
        [f"{group.name}={option.stem}"]
        for group in sorted(p for p in CONF.iterdir() if p.is_dir())
        for option in sorted(group.glob("*.yaml"))
    ]
    choices.append(["imports=[tests.plugin_reward]"])  # TRAINING.md's user reward
    keys: set[str] = set()
    for argv in choices:
        rc, out = _run(_train_main, [*argv, "--cfg", "job"])
        assert rc == 0, f"agpo-train {' '.join(argv)} --cfg job: {out[-1000:]}"
        keys |= set(_flatten(yaml.safe_load(out)))
    return frozenset(keys)


def _key_mentions() -> list[tuple[str, str]]:
    sections = {k.split(".")[0] for k in _known_keys()}
    key_re = re.compile(rf"^(?:{'|'.join(sorted(sections))})(?:\.[a-z0-9_]+)+(?==|:|$)")
    found = {}
    for doc in DOCS:
        for no, code in _code_pieces(doc.read_text()):
            for token in code.split():
                token = token.strip("`,;()").lstrip("+~")
                m = key_re.match(token)
                if m and not PLACEHOLDER.search(token):
                    found.setdefault(m.group(0), f"{doc.name}:{no}")
    return sorted((w, k) for k, w in found.items())


NOT_KEYS = {
    "checkpoint.async_save": "CHECKPOINTS.md says there is no such key",
    "trainer.stepz": "TRAINING.md's example of a misspelt key and its error",
}
"""Mentions that look like keys and are, knowingly, not config keys."""


def _python_name(mention: str) -> bool:
    """`trainer.step.sequence_multiple`: a module of the package and a name in it, or HF
    weight names (`model.norm.weight`) and files (`parallel.py`)."""
    import importlib

    parts = mention.split(".")
    if parts[-1] in ("weight", "bias", "py", "md", "json", "yaml"):
        return True
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("megatron_agpo." + ".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_config_keys_in_the_docs_exist():
    mentions = _key_mentions()
    assert len(mentions) >= 30, mentions  # the extraction finds the docs' keys
    known = _known_keys()
    missing = [
        f"{where}: {key}"
        for where, key in mentions
        if key not in known and key not in NOT_KEYS and not _python_name(key)
    ]
    assert not missing, "keys the docs name that the config does not have:\n" + "\n".join(missing)


def test_docs_list_every_preset():
    # The presets are the files of conf/algorithm/ (and algorithms.PRESETS); where the docs
    # list them, they list them all.
    from megatron_agpo.algorithms import PRESETS

    presets = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))
    assert presets == sorted(PRESETS)
    algorithm_md = (REPO / "docs" / "ALGORITHM.md").read_text()
    block = algorithm_md.split("| preset |", 1)[1].split("\n\n", 1)[0]
    table = set(re.findall(r"^\| `([a-z_]+)` \|", block, re.MULTILINE))
    assert table == set(presets), table ^ set(presets)
    training = " ".join((REPO / "docs" / "TRAINING.md").read_text().split())
    listed = re.search(r"The presets \(`algorithm=`.*?\): (.*?); their rules", training)
    assert listed, "TRAINING.md's list of presets"
    assert sorted(re.findall(r"`([a-z_]+)`", listed.group(1))) == presets
    assert f"any of the {len(presets)} presets" in training
