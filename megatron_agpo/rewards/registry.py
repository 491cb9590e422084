"""The trainer's reward, chosen by config: `reward.name` picks a factory registered here.

A task adds its reward with `@register_reward("name", config=MySettings)` on a function that
takes the whole reward section and returns an object with the `Reward` interface
(`score_batch`, `stats`, `close`); its settings are then `reward.<name>.<field>` on the
command line and the factory reads them as `section.<name>`. The module that registers must
be imported before the config is composed: built-in rewards are imported lazily below, a
user's by the run's `imports=[module]` setting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_agpo.registry import Registry
from megatron_agpo.rewards.base import Reward

RewardFactory = Callable[[Any], Reward]
REWARDS = Registry(
    "reward",
    "reward.name",
    # Built-in rewards, imported on first use so that a math run never imports the others.
    builtins={"math": "megatron_agpo.rewards.math", "relevance": "megatron_agpo.rewards.relevance"},
)


def register_reward(
    name: str, config: type | None = None
) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make `factory(reward_section) -> Reward` available as `reward.name=<name>`,
    with `config` (a dataclass) as its settings `reward.<name>.*`."""
    return REWARDS.register(name, config)


def reward_names() -> list[str]:
    """Every name `reward.name` accepts (built-in and registered)."""
    return REWARDS.names()


def build_reward(section: Any) -> Reward:
    """The reward named by `section.name`, built from `section`."""
    return REWARDS.get(section.name).build(section)
