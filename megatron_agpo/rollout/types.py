"""The rollout boundary: typed records, errors and the `RolloutEngine` protocol.

The trainer sees only this module. Whether samples come from an engine inside the training
process or from replica processes is the engine's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt to sample `n` responses for."""

    prompt_token_ids: tuple[int, ...]
    """The prompt, already tokenized (chat template applied). Never truncated by the engine."""
    n: int = 1
    """Samples per prompt (the group size for group-relative advantages)."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 256
    """Upper bound on response length; the prompt must leave this much room in the context."""
    stop: tuple[str, ...] = ()
    """Stop strings (excluded from the response text)."""
    seed: int | None = None
    """Per-request sampling seed; with a seed the samples do not depend on which engine or
    replica serves the request, nor on what else is batched with it."""
    ignore_eos: bool = False
    """Keep sampling past EOS up to `max_new_tokens` (fixed-length benchmarks)."""

    def __post_init__(self) -> None:
        # Accept lists at the call site but store tuples so requests are hashable and immutable.
        object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.prompt_token_ids:
            raise ValueError("RolloutRequest.prompt_token_ids is empty")
        if self.n < 1:
            raise ValueError(f"RolloutRequest.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"RolloutRequest.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"RolloutRequest.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0.0:
            raise ValueError(f"RolloutRequest.temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class Sample:
    """One sampled response."""

    prompt_id: int
    """Index of the request in the `generate` call that produced this sample."""
    sample_index: int
    """0..n-1 within its request."""
    prompt_token_ids: tuple[int, ...]
    response_token_ids: tuple[int, ...]
    text: str
    """Detokenized response (stop string excluded)."""
    logprobs: tuple[float, ...]
    """The engine's log p(token) for each response token: log_softmax of the raw logits
    (vLLM `logprobs_mode="raw_logprobs"`), i.e. at temperature 1 and before top-p/top-k
    renormalisation, so it is comparable to the trainer's own log-probs of the same tokens."""
    finish_reason: FinishReason
    truncated: bool
    """True when the response hit `max_new_tokens` without finishing (no EOS / stop string)."""
    weight_version: int
    """Version of the weights that produced this sample (see `RolloutEngine.weight_version`);
    with a partial rollout that continued under newer weights, the version of its first
    token (the oldest)."""
    token_versions: tuple[int, ...] = ()
    """The version that sampled each response token, when they differ (a partial rollout
    interrupted by a weight update and resumed, `rollout.partial=resume`); empty: every token
    is `weight_version`'s."""
    routed_experts: Any = field(default=None, compare=False, repr=False)
    """Mixture-of-experts models with `return_routed_experts`: the experts the engine sent
    each token to, a numpy integer array [prompt + response - 1 tokens, MoE layers, top-k]
    (the last sampled token never passes through the model); None otherwise. For the
    trainer's router replay (`megatron_agpo.models.moe`)."""

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.response_token_ids):
            raise ValueError(
                f"sample (prompt {self.prompt_id}, #{self.sample_index}): "
                f"{len(self.logprobs)} log-probs for {len(self.response_token_ids)} tokens"
            )
        if self.token_versions and len(self.token_versions) != len(self.response_token_ids):
            raise ValueError(
                f"sample (prompt {self.prompt_id}, #{self.sample_index}): "
                f"{len(self.token_versions)} token versions for "
                f"{len(self.response_token_ids)} tokens"
            )

    def versions(self) -> tuple[int, ...]:
        """The version of every response token."""
        return self.token_versions or (self.weight_version,) * len(self.response_token_ids)


class RolloutError(RuntimeError):
    """A rollout or weight sync failed (engine error, dead or silent replica)."""


class RolloutTimeoutError(RolloutError, TimeoutError):
    """An engine did not answer within its configured time."""


class PromptTooLongError(ValueError):
    """A prompt leaves no room for `max_new_tokens` in the engine's context."""

    def __init__(self, index: int, length: int, limit: int, max_new_tokens: int) -> None:
        self.index, self.length, self.limit = index, length, limit
        super().__init__(
            f"prompt {index} has {length} tokens; the engine accepts at most {limit} "
            f"(max_model_len - max_new_tokens={max_new_tokens}). Prompts are never truncated: "
            "filter or shorten it before the rollout."
        )


class StaleWeightsError(RuntimeError):
    """Samples were produced by weights other than the ones the trainer expects, or by a mix."""


@dataclass(frozen=True)
class RolloutBatch:
    """All samples of one `generate` call, ordered by (prompt_id, sample_index), produced by a
    single weight version."""

    samples: tuple[Sample, ...]
    weight_version: int

    @classmethod
    def from_samples(
        cls,
        samples: Iterable[Sample],
        expected_version: int | None = None,
        allow_mixed: bool = False,
    ) -> RolloutBatch:
        """Build a batch, refusing mixed versions and (when given) any other version than
        `expected_version`. allow_mixed (overlapped generation, `trainer.max_staleness` > 0):
        samples of several versions are accepted, each keeping its own; the batch's
        `weight_version` is then the oldest, and the trainer bounds the staleness."""
        ordered = tuple(sorted(samples, key=lambda s: (s.prompt_id, s.sample_index)))
        if not ordered:
            raise ValueError("a RolloutBatch needs at least one sample")
        versions = sorted({s.weight_version for s in ordered})
        if allow_mixed:
            return cls(samples=ordered, weight_version=versions[0])
        if len(versions) > 1:
            counts = {v: sum(s.weight_version == v for s in ordered) for v in versions}
            raise StaleWeightsError(
                f"rollout batch mixes weight versions {counts} (version: samples); "
                "every sample of a batch must come from the same weights"
            )
        if expected_version is not None and versions[0] != expected_version:
            raise StaleWeightsError(
                f"rollout batch was produced by weight version {versions[0]}, "
                f"the trainer expects version {expected_version}: sync weights first"
            )
        return cls(samples=ordered, weight_version=versions[0])

    def by_prompt(self) -> list[list[Sample]]:
        """Samples grouped per prompt, in prompt order."""
        groups: dict[int, list[Sample]] = {}
        for s in self.samples:
            groups.setdefault(s.prompt_id, []).append(s)
        return [groups[k] for k in sorted(groups)]


@dataclass(frozen=True)
class SyncReport:
    """What one weight sync moved and how long it took."""

    weight_version: int
    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float
    replica_seconds: tuple[float, ...] = field(default=())
    """Time each engine spent inside `reload_weights` (one entry per replica)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    @property
    def weight_version(self) -> int:
        """Version of the weights now served (0 = the checkpoint the engine started from)."""
        ...

    @property
    def max_model_len(self) -> int: ...

    def generate(
        self, requests: Sequence[RolloutRequest], expected_version: int | None = None
    ) -> RolloutBatch:
        """Sample every request; refuses too-long prompts and stale or mixed weight versions."""
        ...

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[list[float]]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, from every serving engine:
        indexed [engine][sequence][t - 1]."""
        ...

    def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> SyncReport:
        """Load HF-named full tensors into every engine and set its weight version."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory between rollouts where supported (no-op otherwise)."""
        ...

    def wake_up(self) -> None: ...

    def close(self) -> None: ...
