"""The planner's root config: a run's config and the cluster it is sized for.

`agpo-plan` reads the same conf/ and overrides as `agpo-train` plus the `cluster` section
(conf/cluster/, the model presets' `cluster:` blocks, `cluster.*` overrides), which only the
planner reads: the trainer's `TrainConfig` has no cluster, so it never shows in the trainer's
`--help-all`, config.json or W&B.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from megatron_agpo.plan.cluster import ClusterSection
from megatron_agpo.trainer.config import TrainConfig, schema


@dataclass
class PlanConfig(TrainConfig):
    """A run's config (every section of `TrainConfig`) and the cluster it is planned for."""

    cluster: ClusterSection = field(default_factory=ClusterSection)
    """The machines the run is planned for and the planner's assumptions."""


def plan_schema() -> type[PlanConfig]:
    """PlanConfig over the run's schema (with the settings of registered user rewards)."""
    base = schema()
    return PlanConfig if base is TrainConfig else _extended(base)


@functools.cache
def _extended(base: type) -> type:
    return dataclasses.make_dataclass(
        "PlanConfig",
        [("cluster", ClusterSection, field(default_factory=ClusterSection))],
        bases=(base, PlanConfig),
    )


def cluster_override(text: str) -> bool:
    """Whether an override sets the cluster section (`cluster=h200`, `cluster.nodes=8`)."""
    key = text.partition("=")[0].lstrip("+~")
    return key == "cluster" or key.startswith("cluster.")


def load_plan_config(overrides: list[str], validate: bool = True) -> PlanConfig:
    """conf/train.yaml with `overrides`, as the planner's root: the run's config checked as
    `agpo-train` checks it (`load_config`), the cluster section typed and checked here."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from megatron_agpo.trainer.compose import (
        UsageError,
        _hydra_message,
        compose,
        load_config,
        load_plugins,
    )

    load_plugins(overrides)
    problems = [_cluster_key_problem(o) for o in overrides if cluster_override(o)]
    problems = [p for p in problems if p]
    if problems:
        raise UsageError(*problems)
    # The run's keys and values, checked as agpo-train checks them.
    load_config([o for o in overrides if not cluster_override(o)], validate=validate)
    try:
        plan = OmegaConf.to_object(compose(overrides, root=plan_schema()))
    except OmegaConfBaseException as e:
        raise UsageError(_hydra_message(e)) from e
    if validate:
        found = plan.cluster.problems("cluster.")
        if found:
            raise UsageError(*found)
    return plan


def _cluster_key_problem(override: str) -> str | None:
    import difflib

    key = override.partition("=")[0].lstrip("+~")
    if key == "cluster":
        return None  # a conf/cluster option: Hydra names a missing one
    names = [f.name for f in dataclasses.fields(ClusterSection)]
    leaf = key.removeprefix("cluster.")
    if leaf in names:
        return None
    close = difflib.get_close_matches(leaf, names, n=3, cutoff=0.6)
    hint = f"did you mean cluster.{close[0]}?" if close else f"cluster has: {', '.join(names)}"
    return f"{key}: no such key ({hint})"
