"""Committed results name no folder of the machine that made them (issue 25): paths are
relative to the repository or start with ~, and the tools that write them make them so."""

import json
import re
from pathlib import Path

import pytest

from megatron_agpo.eval.results import REPO_ROOT, portable_paths
from tests.test_algorithms_study import fake_run

RESULTS = REPO_ROOT / "docs" / "results"
# An absolute folder: "/" then a word and another "/" (a URL's "//" or a fraction "1/2" do not
# match: the slash must start the string or follow a space, quote, = or colon).
ABSOLUTE = re.compile(r"""(?:^|[\s"'=:(])/[A-Za-z0-9_.-]+/""")


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.json")))
def test_committed_results_hold_no_machine_paths(name):
    rec = json.loads((RESULTS / name).read_text())
    bad = [s for s in _strings(rec) if ABSOLUTE.search(s)]
    assert not bad, f"{name}: absolute paths {bad[:5]}"


def test_portable_paths():
    repo, home = Path("/srv/me/repo"), Path("/srv/me")
    rec = {
        "out": "/srv/me/repo/runs/study",
        "docs": "/srv/me/repo",
        "model": "/srv/me/.cache/megatron_agpo/tiny-arith-0123",
        "cmd": "run.sh --out /srv/me/repo/runs/x --cache /srv/me/c",
        "list": ["/srv/me", "/data/shared/x", 3, None],
        "/srv/me/repo/k": 1.5,
        "text": "1/2 and http://example.org/a",
    }
    assert portable_paths(rec, repo, home) == {
        "out": "runs/study",
        "docs": ".",
        "model": "~/.cache/megatron_agpo/tiny-arith-0123",
        "cmd": "run.sh --out runs/x --cache ~/c",
        "list": ["~", "/data/shared/x", 3, None],  # outside both: left as it is
        "k": 1.5,
        "text": "1/2 and http://example.org/a",
    }


@pytest.fixture
def study(monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "agpo_study", REPO_ROOT / "tools" / "agpo_study.py"
    )
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "agpo_study", mod)  # its dataclasses look themselves up
    spec.loader.exec_module(mod)
    return mod


def test_study_tool_writes_portable_paths(study, tmp_path, monkeypatch):
    # The graded study's report, with its run and docs folders in the home folder: the record
    # it writes says ~/..., not the absolute folder.
    monkeypatch.setenv("HOME", str(tmp_path))
    out, docs = tmp_path / "runs", tmp_path / "docs"
    for seed in range(2):
        fake_run(out, "base", seed, 8, [0, 1, 2])
        fake_run(out, "grpo", seed, 8, [1, 2, 3])
    a = study.StudyArgs(steps=3, seeds=2, held_out=3, out=str(out), docs=str(docs),
                        resamples=50, arms=["grpo"])  # fmt: skip
    study.report(a)
    rec = json.loads((docs / "study_graded.json").read_text())
    assert rec["args"]["out"] == "~/runs" and rec["args"]["docs"] == "~/docs"
    assert not [s for s in _strings(rec) if str(tmp_path) in s]
