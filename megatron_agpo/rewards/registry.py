"""The trainer's reward, chosen by config: `reward.name` picks a factory registered here.

A task adds its reward with `@register_reward("name")` on a function that takes the whole
`RewardSection` (so it reads its own sub-config) and returns an object with the `Reward`
interface (`score_batch`, `stats`, `close`). The module that registers must be imported
before `build_reward` runs; built-in rewards are imported lazily below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from megatron_agpo.rewards.base import Reward

RewardFactory = Callable[[Any], Reward]
_REGISTRY: dict[str, RewardFactory] = {}
# Built-in rewards, imported on first use so that a math run never imports the others.
_BUILTIN = {
    "math": "megatron_agpo.rewards.math",
    "relevance": "megatron_agpo.rewards.relevance",
}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make `factory(reward_section) -> Reward` available as `reward.name=<name>`."""

    def wrap(factory: RewardFactory) -> RewardFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def reward_names() -> list[str]:
    """Every name `reward.name` accepts (built-in and registered)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def build_reward(section: Any) -> Reward:
    """The reward named by `section.name`, built from `section`."""
    name = section.name
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise ValueError(f"reward.name={name!r}: one of {', '.join(reward_names())}")
    return _REGISTRY[name](section)
