"""vLLM rollouts behind a small protocol, in the training process or in replica processes,
with streamed weight sync and a built-in parity check."""

from megatron_agpo.rollout.config import RolloutConfig
from megatron_agpo.rollout.types import (
    PromptTooLongError,
    RolloutBatch,
    RolloutEngine,
    RolloutError,
    RolloutRequest,
    RolloutTimeoutError,
    Sample,
    StaleWeightsError,
    SyncReport,
)
from megatron_agpo.rollout.weight_sync import ParityReport, iter_buckets, sync_and_verify

# The engines import vLLM / ZMQ; they are imported from their modules on use:
#   from megatron_agpo.rollout.colocated import ColocatedEngine
#   from megatron_agpo.rollout.replicas import ReplicaPool

__all__ = [
    "ParityReport",
    "PromptTooLongError",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutError",
    "RolloutRequest",
    "RolloutTimeoutError",
    "Sample",
    "StaleWeightsError",
    "SyncReport",
    "iter_buckets",
    "sync_and_verify",
]
