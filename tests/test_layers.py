"""The package's floors: no import from a lower floor to a higher one, no cycle between parts.

Read statically (ast) from every module, function-local imports included: a lazy import hides
a cycle from Python, not from the design. The floors, lowest first:

0. the package root and helpers every part may use (registry, compat, backends, signals,
   the process launcher, the build-once cache);
1. components: algorithms, ops, data, rewards, models, rollout, parallel;
2. the trainer (composes components, owns the run's config), eval, validate;
3. applications and entry points: plan (its root config adds the cluster to the run's),
   relevance, train (agpo-train), demo.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "megatron_agpo"
FLOORS = {
    "": 0,
    "registry": 0,
    "compat": 0,
    "backends": 0,
    "early_signals": 0,
    "launcher": 0,
    "cache": 0,
    "algorithms": 1,
    "ops": 1,
    "data": 1,
    "rewards": 1,
    "models": 1,
    "rollout": 1,
    "parallel": 1,
    "trainer": 2,
    "eval": 2,
    "validate": 2,
    "plan": 3,
    "relevance": 3,
    "train": 3,
    "demo": 3,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to ('' for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges() -> set[tuple[str, str, str]]:
    """(importer part, imported part, importer module) for every package-internal import."""
    mods = _modules()
    out = set()
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                targets = [mod]
            for t in targets:
                if t == "megatron_agpo" or t.startswith("megatron_agpo."):
                    out.add((_part(name), _part(t), name))
    return out


def test_every_part_has_a_floor():
    parts = {_part(m) for m in _modules()}
    assert parts <= set(FLOORS), f"parts without a floor: {sorted(parts - set(FLOORS))}"


def test_no_import_reaches_a_higher_floor():
    upward = sorted(
        f"{mod} ({src}, floor {FLOORS[src]}) imports {dst} (floor {FLOORS[dst]})"
        for src, dst, mod in _edges()
        if FLOORS.get(dst, 0) > FLOORS.get(src, 0)
    )
    assert not upward, "\n".join(upward)


def test_no_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in _edges():
        if src != dst and dst:
            graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend([*path, node, nxt])
                return True
            if nxt not in state and visit(nxt, [*path, node]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if node not in state and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)
