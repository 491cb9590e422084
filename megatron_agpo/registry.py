"""Registries: a component registers its builder together with the dataclass of its settings.

The pattern of verl's registries and torchtitan's `Configurable`: the reward, data source or
advantage estimator that a run names (`reward.name=math`, `data.kind=relevance`) is looked up
here, and the settings it reads live in its own dataclass, registered beside it. The run's
config (`megatron_agpo.trainer.config.TrainConfig`) only composes those dataclasses: a new
component adds one decorated function and one dataclass, and its settings become keys on the
command line (`reward.<name>.<field>=...`), in `--help-all` and in config.json.

A module that registers must be imported before the config is composed: built-in components
are named here by module and imported on first use; a user's are imported by the run's
`imports=[my_package.rewards]` setting (read before anything else is parsed).

Every config dataclass reports its own problems with `problems(prefix) -> list[str]`, one line
each naming the full key (`prefix` + field); `config_problems` walks a tree of them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, what builds it, and its settings' dataclass
    (None: it has no settings of its own)."""

    name: str
    build: Callable[..., Any]
    config: type | None = None


class Registry:
    """Components of one kind, by name. `key` is the setting that picks one (for messages);
    `builtins` maps built-in names to the module that registers them."""

    def __init__(self, kind: str, key: str, builtins: dict[str, str] | None = None) -> None:
        self.kind, self.key = kind, key
        self._entries: dict[str, Entry] = {}
        self._builtins = dict(builtins or {})

    def register(self, name: str, config: type | None = None):
        """Decorator: register `build` under `name`, with its settings' dataclass."""
        if config is not None and not dataclasses.is_dataclass(config):
            raise TypeError(f"{self.kind} {name!r}: config must be a dataclass, got {config!r}")

        def wrap(build: Callable[..., Any]) -> Callable[..., Any]:
            self._entries[name] = Entry(name, build, config)
            return build

        return wrap

    def names(self) -> list[str]:
        """Every name the setting accepts (built-in and registered)."""
        return sorted(set(self._entries) | set(self._builtins))

    def get(self, name: str) -> Entry:
        """The entry for `name` (its module imported if built-in); ValueError naming the key."""
        if name not in self._entries and name in self._builtins:
            importlib.import_module(self._builtins[name])
        if name not in self._entries:
            raise ValueError(f"{self.key}={name!r}: one of {', '.join(self.names())}")
        return self._entries[name]

    def configs(self) -> dict[str, type]:
        """name -> settings dataclass of every component that has one (imports built-ins)."""
        for name in self._builtins:
            self.get(name)
        return {n: e.config for n, e in sorted(self._entries.items()) if e.config is not None}


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import the modules named by the run's `imports` setting (they register components);
    ValueError naming the module when one cannot be imported."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"imports: cannot import {name!r} ({e})") from e


def config_problems(obj: Any, prefix: str = "") -> list[str]:
    """Every problem of a tree of config dataclasses: each node's own `problems(prefix)`, then
    its dataclass children's, depth first, with the dotted key path as prefix."""
    out: list[str] = []
    own = getattr(obj, "problems", None)
    if callable(own) and prefix:  # the root composes its own checks
        out.extend(own(prefix))
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            out.extend(config_problems(child, f"{prefix}{f.name}."))
    return out


def need(out: list[str], ok: bool, key: str, value: Any, rule: str) -> None:
    """Append `key=value: rule` to `out` unless `ok` (the one message shape of a bad value)."""
    if not ok:
        out.append(f"{key}={value!r}: {rule}")


def require_valid(cfg: Any, prefix: str) -> None:
    """For a component built from a config made in code (not by `load_config`): ValueError
    listing the config's problems, one line each naming the key."""
    found = cfg.problems(prefix)
    if found:
        raise ValueError("\n".join(found))
