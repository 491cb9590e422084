"""Rewards: the `Reward` interface and the math answer reward (math-verify under a deadline)."""

from megatron_agpo.rewards.answer import AnswerCheck, check_answer, find_boxes, last_boxed
from megatron_agpo.rewards.base import (
    Reward,
    RewardStats,
    RewardUnavailable,
    reward_counters,
    scored_groups,
)
from megatron_agpo.rewards.math import (
    MathReward,
    RewardConfig,
    default_math_reward,
    math_reward,
    score_batch,
    verify_boxed_answer,
)
from megatron_agpo.rewards.pool import CallTimeout, DeadlinePool, WorkerError
from megatron_agpo.rewards.registry import build_reward, register_reward, reward_names

__all__ = [
    "AnswerCheck",
    "CallTimeout",
    "DeadlinePool",
    "MathReward",
    "Reward",
    "RewardConfig",
    "RewardStats",
    "RewardUnavailable",
    "reward_counters",
    "scored_groups",
    "WorkerError",
    "build_reward",
    "register_reward",
    "reward_names",
    "check_answer",
    "default_math_reward",
    "find_boxes",
    "last_boxed",
    "math_reward",
    "score_batch",
    "verify_boxed_answer",
]
