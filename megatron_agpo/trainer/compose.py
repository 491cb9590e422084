"""The run's configuration as the command line sees it: conf/ composed with Hydra overrides.

`load_config(overrides)` is the one way a `TrainConfig` is made from conf/ (agpo-train, agpo-plan,
the tools and benchmarks): each override is checked against the schema first (an unknown key
names the closest ones), the modules named by `imports=[...]` are imported before that (they
register components whose settings extend the schema), Hydra composes, and the result is
validated by every section's `problems(prefix)`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import typing
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
PROG = "agpo-train"


class UsageError(ValueError):
    """A bad command line or configuration: printed as `agpo-train: error: <line>` per
    problem, exit code 2."""

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


# ------------------------------------------------------------------ schema and docs


def _schema():
    from megatron_agpo.trainer.config import schema

    return schema()


@functools.cache
def _field_types(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings (the string after each field) of a dataclass."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, SyntaxError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _child(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls`, None for a leaf."""
    t = _field_types(cls).get(name)
    return t if dataclasses.is_dataclass(t) else None


def iter_keys(cls: type | None = None, prefix: str = ""):
    """(dotted key, docstring) of every leaf setting, in declaration order."""
    cls = cls or _schema()
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        sub = _child(cls, f.name)
        if sub is not None:
            yield from iter_keys(sub, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", docs.get(f.name, "")


def key_problem(key: str) -> str | None:
    """Why `key` (dotted) is not a setting of the schema; None when it is."""
    cls, parts = _schema(), key.split(".")
    if parts[0] == "cluster" and "cluster" not in [f.name for f in dataclasses.fields(cls)]:
        return (
            f"{key}: the cluster section sizes a plan and belongs to agpo-plan "
            f"(`agpo-plan ... {key}=...`); {PROG} does not read it"
        )
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            hint = (
                f"did you mean {' or '.join('.'.join([*parts[:i], c]) for c in close)}?"
                if close
                else f"{where} has: {', '.join(names)}"
            )
            return f"{key}: no such key ({hint}); `{PROG} --help-all` lists every key"
        sub = _child(cls, part)
        if sub is None:
            if i < len(parts) - 1:
                return f"{key}: {'.'.join(parts[: i + 1])} is a value, not a section"
            return None
        cls = sub
    if len(parts) and cls is not _schema():
        return None  # a whole section (`rollout.engine={...}`): Hydra checks its fields
    return None


def config_groups() -> dict[str, list[str]]:
    """conf/ group -> its options (file names without .yaml)."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONF_DIR.iterdir())
        if d.is_dir()
    }


def default_options() -> dict[str, str]:
    """The option each group has in conf/train.yaml's defaults list."""
    import yaml

    defaults = yaml.safe_load((CONF_DIR / "train.yaml").read_text()).get("defaults", [])
    return {k: v for item in defaults if isinstance(item, dict) for k, v in item.items()}


def check_overrides(overrides: list[str]) -> list[str]:
    """Each override against the schema and conf/ before Hydra sees it: unknown keys (also
    with `+`, which Hydra would add and the dataclass silently drop), unknown group options,
    syntax errors. Returns the problems; sweeps are checked value by value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    groups = config_groups()
    out: list[str] = []
    parser = OverridesParser.create()
    for text in overrides:
        try:
            (o,) = parser.parse_overrides([text])
        except OverrideParseException as e:
            msg = " ".join(str(e).split("\n")[0].split())
            out.append(f"{text!r}: not a Hydra override ({msg}); write key=value")
            continue
        key = o.key_or_group
        if key in groups:
            if o.is_delete():
                out.append(f"~{key}: config group {key} cannot be removed")
                continue
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for v in values:
                if str(v) not in groups[key]:
                    out.append(
                        f"{key}={v}: no such option; {key} is one of {', '.join(groups[key])}"
                    )
            continue
        if key == "hydra" or key.startswith("hydra."):
            out.append(
                f"{key}: Hydra's own settings are not used ({PROG} composes the config "
                "itself); outputs go to logging.run_dir"
            )
            continue
        problem = key_problem(key)
        if problem:
            out.append(problem)
        elif o.is_add():
            out.append(f"+{key}: the key exists; set it without '+' ({key}=...)")
        elif o.is_delete():
            out.append(f"~{key}: settings cannot be removed; set a value instead")
    return out


# ------------------------------------------------------------------ composition


def conf_root(schema: type | None = None) -> type:
    """What conf/ composes into: the run's schema, plus the planner's `cluster` section that
    conf/ also carries (conf/cluster/, the model presets' `cluster:` blocks) as an opaque
    value. The trainer drops it (`load_config`); `agpo-plan` composes with its own root
    (`megatron_agpo.plan.config.PlanConfig`), where it is typed and checked."""
    schema = schema or _schema()
    return _with_opaque_cluster(schema)


@functools.cache
def _with_opaque_cluster(schema: type) -> type:
    if "cluster" in {f.name for f in dataclasses.fields(schema)}:
        return schema
    return dataclasses.make_dataclass(
        schema.__name__,
        [("cluster", typing.Any, dataclasses.field(default=None))],
        bases=(schema,),
    )


def compose(overrides: list[str], root: type | None = None):
    """conf/train.yaml composed with `overrides` (an OmegaConf DictConfig) under the schema
    `root` (default `conf_root()`); Hydra's errors become one-line `UsageError`s naming the
    key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name="train_schema", node=root or conf_root())
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError(_hydra_message(e)) from e


def _hydra_message(e: BaseException) -> str:
    """One line from a Hydra / OmegaConf error: the key and what went wrong."""
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    msg = getattr(cause, "msg", None) or str(cause)
    first = " ".join(msg.strip().split("\n")[0].split())
    if "could not be converted to" in first:
        want = first.rsplit(" ", 1)[-1].lower().rstrip(".")
        value = first.split("'")[1] if "'" in first else "?"
        return f"{key}={value}: expected {'an' if want[0] in 'aeiou' else 'a'} {want}"
    return f"{key}: {first}" if key else first


def plugin_modules(overrides: list[str]) -> list[str]:
    """The modules an `imports=` override names (`imports=[a.b,c]` or `imports=a.b`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    out: list[str] = []
    for text in overrides:
        if text.partition("=")[0].lstrip("+") != "imports":
            continue
        try:
            (o,) = OverridesParser.create().parse_overrides([text])
        except OverrideParseException:
            continue  # check_overrides reports it
        value = o.value()
        out += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return out


def load_plugins(overrides: list[str]) -> None:
    """Import what `imports=` names, before the overrides are checked against the schema."""
    from megatron_agpo.registry import import_plugins

    try:
        import_plugins(plugin_modules(overrides))
    except ValueError as e:
        raise UsageError(str(e)) from e


def load_config(overrides: list[str], validate: bool = True):
    """conf/train.yaml composed with Hydra overrides, as a TrainConfig (validated unless
    validate=False; the checks that read files are `megatron_agpo.validate.preflight`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    load_plugins(overrides)
    problems = check_overrides(overrides)
    if problems:
        raise UsageError(*problems)
    composed = compose(overrides)
    try:
        full = OmegaConf.to_object(composed)
    except OmegaConfBaseException as e:
        raise UsageError(_hydra_message(e)) from e
    # The trainer's config: what conf/ composed, without the planner's cluster section.
    schema = _schema()
    cfg = schema(**{f.name: getattr(full, f.name) for f in dataclasses.fields(schema)})
    if validate:
        cfg.validate()
    return cfg


def config_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
