"""The RL math as pure functions on plain tensors: advantages and the policy loss."""

from megatron_agpo.algorithms.advantages import (
    PRESETS,
    AdvantageConfig,
    advantages,
    resolve,
    whiten,
)
from megatron_agpo.algorithms.filtering import group_rows, informative_groups, overlong_filter
from megatron_agpo.algorithms.policy_loss import (
    AGG_MODES,
    PolicyLossConfig,
    TokenLoss,
    aggregate,
    aggregation_weights,
    importance_weight,
    importance_weight_stats,
    kl_estimate,
    polarity_metrics,
    policy_loss,
    resolve_norm_constant,
    sequence_log_ratio,
    sequence_log_ratio_flat,
    token_loss,
)

__all__ = [
    "AGG_MODES",
    "PRESETS",
    "AdvantageConfig",
    "PolicyLossConfig",
    "TokenLoss",
    "advantages",
    "aggregate",
    "aggregation_weights",
    "group_rows",
    "importance_weight",
    "importance_weight_stats",
    "informative_groups",
    "kl_estimate",
    "overlong_filter",
    "policy_loss",
    "polarity_metrics",
    "resolve",
    "resolve_norm_constant",
    "sequence_log_ratio",
    "sequence_log_ratio_flat",
    "token_loss",
    "whiten",
]
