import os

import pytest
import torch

# Tests are deterministic and single-threaded per process unless they say otherwise: the CI
# machine has 2 cores and multi-process tests would oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


NOT_UNIT = ("dist", "engine", "e2e", "slow", "gpu", "slurm")
"""The tiers a test declares itself (pyproject.toml lists what each means). `unit` is the rest:
fast, one process, no vLLM engine, no subprocess. A test that starts an engine is marked
`engine`; one that runs agpo-train, another CLI or the SLURM controller as a subprocess,
`e2e`; one with several processes (gloo ranks, replica or reward workers), `dist`."""


TIER_COST = {"slow": 3, "e2e": 2, "engine": 2, "dist": 1}
"""A rough cost of a test by tier: under pytest-xdist (`AGPO_TEST_WORKERS=2 scripts/test.sh`) the
costly ones are handed out first, so that no worker is left with a minutes-long test at the
end while the other idles."""


def _shared_scope(item) -> str | None:
    """The xdist group of a test that uses a module- or session-scoped fixture of the tests
    (a shared trainer run, an engine): every user of it runs on one worker, which builds it
    once. Named after the module that defines the fixture, or the conftest fixture itself."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in sorted(info.names_closure):
        defs = info.name2fixturedefs.get(name)
        if not defs or defs[-1].scope == "function" or not defs[-1].baseid.startswith("tests"):
            continue
        base = defs[-1].baseid
        return base if base.endswith(".py") else f"{base}::{name}"
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        declared = [m for m in NOT_UNIT if item.get_closest_marker(m)]
        if declared and item.get_closest_marker("unit"):
            raise pytest.UsageError(
                f"{item.nodeid} is marked unit and {', '.join(declared)}: unit means fast, "
                "one process, no engine, no subprocess"
            )
        # Every test gets a tier; the ones that declare none are fast unit tests.
        if not declared:
            item.add_marker(pytest.mark.unit)
        # The local SLURM cluster has one 2-CPU node: its jobs run one at a time anyway. Tests
        # that need several GiB run one at a time too (two of them side by side can exceed
        # the CI machine's memory: the SmolLM2 example was OOM-killed next to another).
        group = next((m for m in ("slurm", "bigmem") if item.get_closest_marker(m)), None)
        group = group or _shared_scope(item)
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
            if config.getoption("loadgroup", default=False):
                _tag_group(item, group)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: costly scheduling units first
        _costly_first(items)


def _tag_group(item, group: str) -> None:
    """What `--dist loadgroup` keys on: the nodeid with "@group" (the scheduler reads the group
    from it). pytest-xdist 3.8 writes it to `item._nodeid`, which pytest 9.2's nodes no longer
    read (their id is `item._id`), so every test was scheduled alone; set it where pytest reads
    it. Done only on xdist workers; a plain run keeps its nodeids."""
    from _pytest.nodeid import NodeId

    if hasattr(item, "_id") and "@" not in item.nodeid.rsplit("]", 1)[-1]:
        item._id = NodeId.parse(f"{item.nodeid}@{group}")


def _costly_first(items) -> None:
    """Reorder `items` in place: scheduling units (an xdist group, else one test) by their
    costliest test's tier, costly first; tests keep their order within a unit and a tier."""
    unit_of = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        unit_of[item] = mark.args[0] if mark and mark.args else item.nodeid
    cost: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        c = max((v for k, v in TIER_COST.items() if item.get_closest_marker(k)), default=0)
        u = unit_of[item]
        cost[u] = max(cost.get(u, 0), c)
        first.setdefault(u, i)
    items.sort(key=lambda it: (-cost[unit_of[it]], first[unit_of[it]]))


@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory):
    """The shared TP=2 run (tests/runs.py: SHORT + TP2_OPTS, 4 steps, checkpoints at steps 2
    and 4): its folder and metrics rows. Read it; do not write into it."""
    from tests.runs import TP2_OPTS, train

    run = tmp_path_factory.mktemp("tp2_run") / "run"
    return run, train(run, 4, *TP2_OPTS)
