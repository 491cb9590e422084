"""Moving HF-named tensors to engines in size-bounded buckets, and checking the result.

Trainer side: `iter_buckets` groups any (hf_name, tensor) iterator (e.g. the output of
`megatron_to_hf_tensors`) into buckets of at most `bucket_bytes`, so the sender holds one
bucket at a time, never a second full copy of the model. `encode_bucket` / `decode_bucket`
turn a bucket into ZMQ frames (a small header plus each tensor's raw bytes) and back.

After a sync, `sync_and_verify` compares the engine's prompt log-probs on fixed sequences
with the caller's reference log-probs (e.g. the trainer's own forward on the same weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from megatron_agpo.rollout.types import RolloutEngine, RolloutError, SyncReport

Bucket = list[tuple[str, torch.Tensor]]


def iter_buckets(
    weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[Bucket]:
    """Group tensors into buckets of at most `bucket_bytes` (a bigger tensor goes alone).

    Tensors are moved to CPU and made contiguous here, one at a time, because the channel
    sends host bytes; the caller's iterator may free each GPU tensor once it is yielded.
    """
    bucket: Bucket = []
    size = 0
    for name, t in weights:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def encode_bucket(bucket: Bucket) -> tuple[dict, list[memoryview]]:
    """(header, [raw bytes of tensor 0, raw bytes of tensor 1, ...]); the byte frames are
    views of the tensors' storage (zero copy until the socket sends them)."""
    specs = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in bucket]
    # uint8 view: numpy has no bfloat16, but every dtype's bytes are plain bytes.
    frames = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for _, t in bucket]
    return {"op": "bucket", "specs": specs}, frames


def decode_bucket(header: dict, frames: Sequence) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one received bucket, viewing the frames' memory (no copy)."""
    for (name, dtype, shape), frame in zip(header["specs"], frames, strict=True):
        with warnings.catch_warnings():
            # The frame's buffer is read-only; vLLM only reads it (copies into its params).
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(frame, dtype=torch.uint8) if len(frame) else torch.empty(0)
        yield name, raw.view(getattr(torch, dtype)).reshape(shape)


@dataclass(frozen=True)
class ParityReport:
    """Engine prompt log-probs after a sync, against the caller's reference."""

    max_abs_diff: float
    """max |engine - reference| over all engines, sequences and positions."""
    mean_abs_diff: float
    max_change_from_before: float
    """max |after - before| : proves the sync changed what the engine computes."""
    sync: SyncReport | None = None


def compare_logprobs(
    engine_lps: Sequence[Sequence[Sequence[float]]], reference: Sequence[Sequence[float]]
) -> tuple[float, float]:
    """(max, mean) |engine - reference| over [engine][sequence][position]."""
    diffs: list[float] = []
    for per_engine in engine_lps:
        for got, ref in zip(per_engine, reference, strict=True):
            if len(got) != len(ref):
                raise ValueError(f"log-prob lengths differ: engine {len(got)}, ref {len(ref)}")
            diffs += [abs(a - b) for a, b in zip(got, ref, strict=True)]
    if not diffs:
        raise ValueError("no log-probs to compare: give sequences of at least 2 tokens")
    return max(diffs), sum(diffs) / len(diffs)


def sync_and_verify(
    engine: RolloutEngine,
    weights: Iterable[tuple[str, torch.Tensor]],
    version: int,
    probe_sequences: Sequence[Sequence[int]],
    reference_logprobs: Sequence[Sequence[float]],
    tolerance: float = 1e-4,
    require_change: bool = True,
) -> ParityReport:
    """Sync `weights` into `engine` as `version`, then check every engine's prompt log-probs
    on `probe_sequences` against `reference_logprobs` (log p(token_t | <t) for t >= 1, from the
    same weights, e.g. the trainer in fp32).

    Raises RolloutError when the difference exceeds `tolerance`, or (with `require_change`)
    when the log-probs did not move at all: a sync that silently loaded nothing.
    """
    before = engine.prompt_logprobs(probe_sequences)
    report = engine.update_weights(weights, version)
    after = engine.prompt_logprobs(probe_sequences)
    max_diff, mean_diff = compare_logprobs(after, reference_logprobs)
    change = max(
        abs(a - b)
        for eng_a, eng_b in zip(after, before, strict=True)
        for sa, sb in zip(eng_a, eng_b, strict=True)
        for a, b in zip(sa, sb, strict=True)
    )
    parity = ParityReport(max_diff, mean_diff, change, report)
    if max_diff > tolerance:
        raise RolloutError(
            f"weight sync to version {version}: engine prompt log-probs differ from the "
            f"reference by up to {max_diff:.3g} (tolerance {tolerance:g}, mean {mean_diff:.3g})"
        )
    if require_change and change == 0.0:
        raise RolloutError(
            f"weight sync to version {version} did not change the engine's log-probs: "
            "were the tensors' names recognised?"
        )
    return parity
