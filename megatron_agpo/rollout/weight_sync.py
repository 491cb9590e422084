"""Moving HF-named tensors to engines in size-bounded buckets, and checking the result.

Trainer side: `iter_buckets` groups any (hf_name, tensor) iterator (e.g. the output of
`megatron_to_hf_tensors`) into buckets of at most `bucket_bytes`, so the sender holds one
bucket at a time, never a second full copy of the model. `encode_bucket` / `decode_bucket`
turn a bucket into ZMQ frames (a small header plus each tensor's raw bytes) and back.
`pack_bucket` / `unpack_bucket` do the same with one flat uint8 tensor instead of frames:
what the collective channel (`CollectiveChannel`, a private gloo/NCCL process group between
the trainer and its replicas) broadcasts while the header goes over ZMQ.

After a sync, `sync_and_verify` compares the engine's prompt log-probs on fixed sequences
with the caller's reference log-probs (e.g. the trainer's own forward on the same weights).
"""

from __future__ import annotations

import math
import socket
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_agpo.rollout.types import RolloutEngine, RolloutError, SyncReport

Bucket = list[tuple[str, torch.Tensor]]


def iter_buckets(
    weights: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    device: str | torch.device = "cpu",
) -> Iterator[Bucket]:
    """Group tensors into buckets of at most `bucket_bytes` (a bigger tensor goes alone).

    Tensors are moved to `device` (CPU for the ZMQ and gloo channels, the trainer's GPU for
    NCCL) and made contiguous here, one at a time; the caller's iterator may free each tensor
    once it is yielded.
    """
    bucket: Bucket = []
    size = 0
    for name, t in weights:
        t = t.detach().to(device).contiguous()
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


WIRE_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
}  # fmt: skip
"""dtypes a bucket header may name (a header names a dtype by string, never by object)."""


def _spec(name: object, dtype: object, shape: object) -> tuple[str, torch.dtype, tuple, int]:
    """Checked (name, dtype, shape, nbytes) of one tensor spec of a received header."""
    if not isinstance(name, str) or dtype not in WIRE_DTYPES:
        raise ValueError(f"bucket spec {name!r}: dtype {dtype!r} is not one of {list(WIRE_DTYPES)}")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"bucket spec {name!r}: bad shape {shape!r}")
    dt = WIRE_DTYPES[dtype]  # type: ignore[index]
    return name, dt, tuple(shape), math.prod(shape) * torch.empty((), dtype=dt).element_size()


def decode_bucket(header: dict, frames: Sequence) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one received bucket, viewing the frames' memory (no copy). Each frame must
    hold exactly the bytes its spec (dtype, shape) describes."""
    specs = header["specs"]
    if len(specs) != len(frames):
        raise ValueError(f"bucket header lists {len(specs)} tensors, {len(frames)} frames came")
    for spec, frame in zip(specs, frames, strict=True):
        name, dt, shape, nbytes = _spec(*spec)
        if len(frame) != nbytes:
            raise ValueError(f"bucket tensor {name!r}: {len(frame)} bytes for {nbytes} expected")
        with warnings.catch_warnings():
            # The frame's buffer is read-only; vLLM only reads it (copies into its params).
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(frame, dtype=torch.uint8) if len(frame) else torch.empty(0)
        yield name, raw.view(dt).reshape(shape)


PACK_ALIGN = 64  # byte offset of every tensor in a packed bucket (any dtype view is aligned)


def _aligned(n: int) -> int:
    return -(-n // PACK_ALIGN) * PACK_ALIGN


def pack_bucket(bucket: Bucket, device: str | torch.device = "cpu") -> tuple[dict, torch.Tensor]:
    """(header, flat uint8 tensor on `device`): every tensor's bytes at an aligned offset.

    The header ("specs": name, dtype, shape, offset; "nbytes") is small and goes over ZMQ; the
    flat tensor is what the collective channel broadcasts.
    """
    specs, offset = [], 0
    for name, t in bucket:
        specs.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset = _aligned(offset + t.numel() * t.element_size())
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, _, _, off), (_, t) in zip(specs, bucket, strict=True):
        raw = t.reshape(-1).view(torch.uint8)
        flat[off : off + raw.numel()].copy_(raw)
    return {"op": "bucket", "specs": specs, "nbytes": offset}, flat


def unpack_bucket(header: dict, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one packed bucket, as views into `flat` (no copy); every spec must lie
    inside `flat` at an aligned offset."""
    for *spec, off in header["specs"]:
        name, dt, shape, n = _spec(*spec)
        if not isinstance(off, int) or off % PACK_ALIGN or off < 0 or off + n > flat.numel():
            raise ValueError(f"bucket tensor {name!r}: offset {off!r} outside the flat bucket")
        yield name, flat[off : off + n].view(dt).reshape(shape)


def collective_backend(requested: str = "auto") -> str:
    """ "nccl" where CUDA is available ("auto"), else "gloo"."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return requested


class CollectiveChannel:
    """A private process group between the trainer (rank 0) and its replicas (ranks 1..N).

    Built directly as a backend object (`ProcessGroupGloo` / `ProcessGroupNCCL`) over its own
    `TCPStore`, hosted by the trainer: no `init_process_group` / `new_group`, so a trainer
    that already holds a default group (its own job's) keeps it untouched, and vLLM's groups
    inside a replica are not involved either. Every operation is bounded by `timeout_s` (the
    backend's own timeout): a peer that dies fails it at once (connection closed), one that
    stalls after `timeout_s`.
    """

    def __init__(
        self,
        store: torch.distributed.Store,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        prefix: str = "agpo_weight_sync",
        host: str = "127.0.0.1",
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        timeout = timedelta(seconds=timeout_s)
        # The key prefix is derived from the run's secret: a process that connects to the
        # store cannot name (read or overwrite) this group's rendezvous keys.
        prefix = torch.distributed.PrefixStore(prefix, store)
        if backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            self.device = torch.device("cuda", torch.cuda.current_device())
            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = ProcessGroupNCCL(prefix, rank, world_size, opts)
        elif backend == "gloo":
            self.device = torch.device("cpu")
            # Gloo's own listening socket on `host` (this process's address on the channel's
            # network), not on whatever the machine's hostname resolves to.
            gloo = torch.distributed.ProcessGroupGloo
            opts = gloo._Options()
            opts._timeout = timeout
            opts._devices = [gloo.create_device(hostname=host)]
            self.pg = gloo(prefix, rank, world_size, opts)
        else:
            raise ValueError(f"unknown collective backend {backend!r} (gloo or nccl)")

    @staticmethod
    def host_store(host: str, port: int, world_size: int, timeout_s: float):
        """The trainer's store, listening on `host` only (port 0 = a free one; read it back
        from `.port`). TCPStore itself would listen on every interface: it is handed a socket
        bound here instead."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            port = sock.getsockname()[1]
        except OSError:
            sock.close()
            raise
        return torch.distributed.TCPStore(
            host,
            port,
            world_size,
            True,
            timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=sock.detach(),  # the store owns (and closes) it now
        )

    @staticmethod
    def connect_store(host: str, port: int, world_size: int, timeout_s: float):
        return torch.distributed.TCPStore(
            host, port, world_size, False, timedelta(seconds=timeout_s)
        )

    @classmethod
    def build_in_thread(cls, *args) -> tuple[threading.Thread, dict]:
        """Construct the group in a daemon thread (the constructor blocks until every rank
        joins); `result["channel"]` or `result["error"]` once the thread ends."""
        result: dict = {}

        def run() -> None:
            try:
                result["channel"] = cls(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                result["error"] = e

        thread = threading.Thread(target=run, name="agpo-collective-init", daemon=True)
        thread.start()
        return thread, result

    def send(self, flat: torch.Tensor, ranks: Sequence[int] | None = None) -> list:
        """Start sending `flat` from rank 0: a broadcast to every rank (`ranks` None) or
        point-to-point sends to `ranks` (a subset sync). Returns the pending works."""
        if ranks is None:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank = 0
            return [self.pg.broadcast([flat], opts)]
        return [self.pg.send([flat], r, 0) for r in ranks]

    def recv(self, nbytes: int, broadcast: bool) -> torch.Tensor:
        """Receive one flat bucket of `nbytes` from rank 0 (blocks, up to the timeout)."""
        flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes == 0:  # nothing was sent (a bucket of empty tensors)
            return flat
        if broadcast:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank = 0
            self.pg.broadcast([flat], opts).wait()
        else:
            self.pg.recv([flat], 0, 0).wait()
        return flat


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
