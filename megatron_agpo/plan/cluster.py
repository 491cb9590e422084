"""The cluster a plan is for, and what the planner assumes beyond the trainer's own config.

`ClusterSection` is the `cluster:` section of the planner's root config
(`megatron_agpo.plan.config.PlanConfig`: the run's config plus this; conf/cluster/); the trainer
does not have it, `agpo-plan` reads it beside every other section, so a plan and a run are sized
from one file. `GPU_KINDS` holds the published figures of each GPU kind; every value can be given by
hand instead (`cluster.gpu=custom` and the `*_override` fields, or any single override).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator's published figures (dense, no sparsity)."""

    name: str
    memory_gib: float
    """Memory a process can allocate, as nvidia-smi reports it (GiB)."""
    bf16_tflops: float
    """Dense BF16 tensor-core peak (TFLOP/s)."""
    fp8_tflops: float
    """Dense FP8 peak (TFLOP/s); 0 where the GPU has no FP8 tensor cores."""
    hbm_gb_s: float
    """Memory bandwidth (GB/s)."""
    intra_node_gb_s: float
    """One direction of the GPU's NVLink bandwidth (GB/s): TP collectives inside a node."""
    inter_node_gb_s: float
    """One GPU's share of the network (GB/s; one 400 Gb/s NIC per GPU = 50): DP collectives,
    pipeline sends and weight sync between nodes."""


GPU_KINDS: dict[str, GpuSpec] = {
    # Published datasheet figures (SXM parts). Memory is what nvidia-smi shows as total.
    "a100": GpuSpec("A100-SXM-80GB", 80.0, 312.0, 0.0, 2039.0, 300.0, 25.0),
    "h100": GpuSpec("H100-SXM-80GB", 79.6, 989.0, 1979.0, 3350.0, 450.0, 50.0),
    "h200": GpuSpec("H200-SXM-141GB", 140.4, 989.0, 1979.0, 4800.0, 450.0, 50.0),
    "b200": GpuSpec("B200-180GB", 179.0, 2250.0, 4500.0, 8000.0, 900.0, 50.0),
    "gb200": GpuSpec("GB200-186GB", 184.0, 2500.0, 5000.0, 8000.0, 900.0, 50.0),
}


@dataclass
class ClusterSection:
    """The machines a run is planned for (`agpo-plan`), and the planner's assumptions.

    The trainer ignores this section. Fields marked "planner only" describe layouts the
    trainer does not run yet (virtual pipeline, context parallelism, recomputation, optimizer
    offload); they let a layout be sized before it does, and default to what the trainer runs.
    """

    nodes: int = 1
    """Nodes in the job."""
    gpus_per_node: int = 8
    """GPUs per node; also the NVLink domain (TP groups larger than this cross the network)."""
    gpu: str = "h100"
    """GPU kind: a100, h100, h200, b200, gb200 (GPU_KINDS), or custom (all *_override set)."""
    memory_gib_override: float = 0.0
    """GPU memory in GiB (0: the kind's)."""
    bf16_tflops_override: float = 0.0
    """Dense BF16 peak TFLOP/s (0: the kind's)."""
    fp8_tflops_override: float = 0.0
    """Dense FP8 peak TFLOP/s (0: the kind's)."""
    hbm_gb_s_override: float = 0.0
    """Memory bandwidth GB/s (0: the kind's)."""
    intra_node_gb_s_override: float = 0.0
    """NVLink GB/s, one direction (0: the kind's)."""
    inter_node_gb_s_override: float = 0.0
    """Network GB/s per GPU (0: the kind's)."""
    model_config: str = ""
    """The architecture to plan for when model.hf_path has no config.json on this machine: a
    config.json path or a file name in megatron_agpo/plan/archs/ (without .json). Empty: the
    hf_path's config.json, else archs/<basename of hf_path>.json, else the tiny model."""
    prompt_tokens_mean: int = 256
    """Mean prompt length in tokens (data-dependent; the planner cannot read it from the
    config)."""
    response_tokens_mean: int = 0
    """Mean generated length in tokens (0: half of rollout.max_new_tokens)."""
    response_tokens_max: int = 0
    """Longest response of a step, which sets the number of decode steps (0:
    rollout.max_new_tokens: in a batch of hundreds of samples one usually runs to the limit)."""
    virtual_pipeline: int = 1
    """Planner only: interleaved (virtual) pipeline stages per rank."""
    context_parallel: int = 1
    """Planner only: context-parallel size (the sequence split across this many ranks)."""
    recompute: str = "none"
    """Planner only beyond "none": activation recomputation, none, selective (attention core)
    or full (every layer's input kept, the layer recomputed in the backward)."""
    offload_optimizer: bool = False
    """Planner only: optimizer state, master weights and gradients moved to host memory while
    the engines generate (what peers do to colocate 70B models)."""
    flash_attention: bool = True
    """Attention without materialised [s, s] scores (TE / flash attention on GPU)."""
    overhead_gib: float = 4.0
    """Per GPU: CUDA context, NCCL buffers, allocator fragmentation and the sleeping engine's
    residue."""
    matmul_efficiency: float = 0.55
    """Share of the BF16 peak FLOP/s that a dense model's training and log-prob passes reach.
    Megatron-Bridge publishes Llama-3-8B pretraining on 8 H100 at 725-744 model TFLOP/s per
    GPU with FP8 (0.37 of the FP8 peak, 0.75 of the BF16 one): 0.55 of the BF16 peak for BF16
    sits between the two."""
    moe_matmul_efficiency: float = 0.12
    """The same share for a mixture-of-experts model (small expert GEMMs, token permutation,
    the router, the all-to-all inside the node): Megatron-Bridge publishes Qwen3-30B-A3B
    pretraining on 16 H100 (TP1 PP2 EP8, 4,096-token sequences, dropless, routing forced
    balanced) at 121 model TFLOP/s per GPU with FP8 (5,275 tokens/s; 118 in its 26.02
    container), 0.12 of the BF16 peak, and GPT-OSS-120B in BF16 on 64 H100 at 153-163 (0.16).
    Only a measurement on H100; on other GPUs set it by hand."""
    hbm_efficiency: float = 0.8
    """Share of the memory bandwidth decode reaches."""
    link_efficiency: float = 0.7
    """Share of NVLink / network bandwidth that collectives reach."""
    decode_step_overhead_ms: float = 0.0
    """Per decode step: scheduling, sampling, kernel launches (0: 8 ms with
    rollout.engine.enforce_eager, 2 ms with CUDA graphs)."""
    collective_latency_us: float = 10.0
    """Latency of one small all-reduce (decode's TP all-reduces are latency-bound)."""
    host_copy_gb_s: float = 2.0
    """Bytes/s of the ZMQ weight-sync channel (serialised through host memory, per replica)."""

    def spec(self) -> GpuSpec:
        """The GPU's figures with the overrides applied; raises naming the field."""
        if self.gpu == "custom":
            base = GpuSpec("custom", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        elif self.gpu in GPU_KINDS:
            base = GPU_KINDS[self.gpu]
        else:
            kinds = ", ".join([*GPU_KINDS, "custom"])
            raise ValueError(f"cluster.gpu={self.gpu!r}: one of {kinds}")
        over = {
            "memory_gib": self.memory_gib_override,
            "bf16_tflops": self.bf16_tflops_override,
            "fp8_tflops": self.fp8_tflops_override,
            "hbm_gb_s": self.hbm_gb_s_override,
            "intra_node_gb_s": self.intra_node_gb_s_override,
            "inter_node_gb_s": self.inter_node_gb_s_override,
        }
        spec = replace(base, **{k: v for k, v in over.items() if v > 0})
        for k in over:
            if k != "fp8_tflops" and getattr(spec, k) <= 0:
                raise ValueError(f"cluster.gpu=custom needs cluster.{k}_override > 0")
        return spec

    def problems(self, prefix: str = "cluster.") -> list[str]:
        """This section's problems, one line each naming the key."""
        out = []
        try:
            self.spec()
        except ValueError as e:
            out.append(str(e))
        for name in ("nodes", "gpus_per_node", "virtual_pipeline", "context_parallel"):
            if getattr(self, name) < 1:
                out.append(f"{prefix}{name}={getattr(self, name)} must be >= 1")
        if self.recompute not in ("none", "selective", "full"):
            out.append(f"{prefix}recompute={self.recompute!r}: none, selective or full")
        for name in ("matmul_efficiency", "moe_matmul_efficiency", "hbm_efficiency",
                     "link_efficiency"):  # fmt: skip
            if not 0 < getattr(self, name) <= 1:
                out.append(f"{prefix}{name}={getattr(self, name)} must be in (0, 1]")
        if self.prompt_tokens_mean < 1:
            out.append(f"{prefix}prompt_tokens_mean={self.prompt_tokens_mean} must be >= 1")
        return out

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node
