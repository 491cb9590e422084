"""A vLLM engine inside the training process.

Weights go from the trainer's iterator straight into `reload_weights`, one tensor at a time:
no channel, no bucket, no second copy. On CUDA, `sleep()` frees the KV cache and offloads the
weights while the trainer runs, and `update_weights` wakes the weights alone first so the KV
cache is not allocated while the trainer's tensors are still alive.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from megatron_agpo.rollout import vllm_engine
from megatron_agpo.rollout.config import RolloutConfig
from megatron_agpo.rollout.types import (
    RolloutBatch,
    RolloutError,
    RolloutRequest,
    StaleWeightsError,
    SyncReport,
)


class ColocatedEngine:
    """`RolloutEngine` backed by one `vllm.LLM` in this process."""

    def __init__(self, config: RolloutConfig) -> None:
        self.config = config
        self.llm = vllm_engine.build_llm(config)
        self._version = 0
        self._sleeping = False
        self._broken = False
        self._sleep_enabled = config.enable_sleep_mode and vllm_engine.sleep_mode_available()

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def _check_awake(self) -> None:
        if self._broken:
            raise RolloutError(
                "colocated engine holds partially reloaded weights after a failed sync: "
                "sync again before generating"
            )
        if self._sleeping:
            raise RolloutError("colocated engine is asleep: call wake_up() before generating")

    def generate(
        self, requests: Sequence[RolloutRequest], expected_version: int | None = None
    ) -> RolloutBatch:
        vllm_engine.check_prompt_lengths(requests, self.max_model_len)
        if expected_version is not None and expected_version != self._version:
            raise StaleWeightsError(
                f"colocated engine serves weight version {self._version}, "
                f"the trainer expects {expected_version}: sync weights first"
            )
        self._check_awake()
        samples = vllm_engine.run_generate(self.llm, requests, range(len(requests)), self._version)
        return RolloutBatch.from_samples(samples, expected_version)

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[list[float]]]:
        self._check_awake()
        return [vllm_engine.run_prompt_logprobs(self.llm, sequences)]

    def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> SyncReport:
        if version <= self._version:
            raise ValueError(
                f"weight version must increase: engine has {self._version}, got {version}"
            )
        t0 = time.perf_counter()
        if self._sleeping:
            # Weights only: the KV cache comes back after the trainer's tensors are gone.
            self.llm.wake_up(tags=["weights"])
        stats: dict[str, int] = {}
        try:
            reload_s = vllm_engine.reload_weights(self.llm, vllm_engine.counted(weights, stats))
        except BaseException as e:
            # A half-applied reload leaves unknown weights: refuse to sample until a full one.
            self._broken = True
            raise RolloutError(f"colocated weight sync to version {version} failed: {e}") from e
        if self._sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping = False
        self._version = version
        self._broken = False
        return SyncReport(
            weight_version=version,
            num_tensors=stats.get("num_tensors", 0),
            num_bytes=stats.get("num_bytes", 0),
            num_buckets=1,
            seconds=time.perf_counter() - t0,
            replica_seconds=(reload_s,),
        )

    def sleep(self) -> None:
        if self._sleep_enabled and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def close(self) -> None:
        # vLLM has no public close for an in-process LLM; dropping the engine releases it.
        self.llm = None  # type: ignore[assignment]
