"""Distributed start-up in one place: process group, megatron parallel state, seeds.

Reads the launcher's environment (torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT;
SLURM: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the first host of SLURM_JOB_NODELIST),
picks NCCL on GPU and gloo on CPU, then builds megatron's TP x PP x DP groups. On CPU it also
turns on `megatron_agpo.compat` so megatron-core's CUDA-only paths run.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_agpo import compat
from megatron_agpo.backends import detect


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallel is whatever is left of the world size."""

    tensor_parallel: int = 1
    """Tensor-parallel size (attention heads and MLP columns split across this many ranks)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (transformer layers split into this many stages)."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence across the TP group (needs TP > 1)."""
    context_parallel: int = 1
    """Context-parallel size: every sequence's tokens split over this many ranks, megatron's
    load-balanced way (2 x CP chunks, rank r holding chunks r and 2CP-1-r;
    `megatron_agpo.trainer.context_parallel`), for responses too long for one GPU's
    activations. Needs Transformer Engine's attention (CUDA); refused elsewhere."""
    expert_parallel: int = 1
    """Expert-parallel size (mixture-of-experts models): each MoE layer's experts split over
    this many ranks, tokens exchanged by all-to-all. It must divide the experts and the world
    size over pipeline_parallel; expert tensor parallelism is 1 (every expert whole on its
    rank). With tensor_parallel > 1 megatron needs sequence_parallel."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (megatron's DistributedOptimizer)."""
    seed: int = 1234
    """Base seed; megatron derives per-TP-rank seeds for the model-parallel RNG tracker."""
    timeout_minutes: int = 30
    """Collective timeout."""

    def problems(self, prefix: str = "parallel.") -> list[str]:
        """This section's own problems, one line each naming the key (`prefix` + field, the
        prefix ending in a dot); pure apart from asking `backends.detect()` whether
        Transformer Engine is usable here."""
        out = []
        for key in ("tensor_parallel", "pipeline_parallel"):
            if getattr(self, key) < 1:
                out.append(f"{prefix}{key}={getattr(self, key)}: must be >= 1")
        if self.sequence_parallel and self.tensor_parallel == 1:
            out.append(f"{prefix}sequence_parallel=True needs {prefix}tensor_parallel > 1")
        if self.expert_parallel < 1:
            out.append(f"{prefix}expert_parallel={self.expert_parallel}: must be >= 1")
        elif self.expert_parallel > 1 and self.tensor_parallel > 1 and not self.sequence_parallel:
            # megatron's MoE layer refuses EP x TP without sequence parallelism.
            out.append(
                f"{prefix}expert_parallel={self.expert_parallel} with {prefix}tensor_parallel="
                f"{self.tensor_parallel} needs {prefix}sequence_parallel=true"
            )
        if self.context_parallel < 1:
            out.append(f"{prefix}context_parallel={self.context_parallel}: must be >= 1")
        elif self.context_parallel > 1 and not detect().transformer_engine:
            # megatron's context parallelism is Transformer Engine's attention (ring exchange
            # of K/V inside TE's fused attention); the local attention has no CP path.
            out.append(
                f"{prefix}context_parallel={self.context_parallel} needs Transformer "
                "Engine's attention on a CUDA GPU, and it is not available here; set "
                f"{prefix}context_parallel=1"
            )
        return out

    def validate(self, world_size: int) -> None:
        mp = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if min(self.tensor_parallel, self.pipeline_parallel, self.context_parallel) < 1:
            raise ValueError(f"parallel sizes must be >= 1, got TP={self.tensor_parallel} "
                             f"PP={self.pipeline_parallel} "
                             f"CP={self.context_parallel}")  # fmt: skip
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = "
                f"{self.tensor_parallel}*{self.pipeline_parallel}*{self.context_parallel} = {mp}"
            )
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel=True needs tensor_parallel > 1")
        ep_pp = self.expert_parallel * self.pipeline_parallel
        if self.expert_parallel < 1 or world_size % ep_pp:
            raise ValueError(
                f"world size {world_size} is not divisible by expert_parallel*PP = "
                f"{self.expert_parallel}*{self.pipeline_parallel}"
            )

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    # "node[03-05,07],gpu1" -> "node03"; "gpu1,gpu2" -> "gpu1"
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank layout from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env:
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_NTASKS", 1)),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR")
            or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # A port derived from the job id keeps two jobs on one node apart.
            master_port=int(
                env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
            ),
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)))


def init_distributed(env: DistEnv | None = None, timeout_minutes: int = 30) -> DistEnv:
    """Create the default process group (NCCL with CUDA, gloo without) if none exists."""
    env = env or read_env()
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank,
                       env.master_addr, env.master_port)  # fmt: skip
    backend = "nccl" if detect().cuda else "gloo"
    if detect().cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return env


def init_parallel(cfg: ParallelConfig | None = None, env: DistEnv | None = None) -> DistEnv:
    """Process group + megatron parallel state (TP, PP, CP, DP) + model-parallel seeds.

    Safe to call when the process group already exists (tests, torchrun with an outer init).
    """
    from megatron.core import parallel_state, tensor_parallel

    cfg = cfg or ParallelConfig()
    compat.enable()  # no-op with CUDA
    env = init_distributed(env, cfg.timeout_minutes)
    cfg.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        context_parallel_size=cfg.context_parallel,
        # Experts whole on their rank (expert TP 1), split over expert_parallel ranks.
        expert_model_parallel_size=cfg.expert_parallel,
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=cfg.timeout_minutes,
        # gloo groups are only used by checkpoint code paths; on CPU the default groups are gloo.
        create_gloo_process_groups=detect().cuda,
    )
    torch.manual_seed(cfg.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    return env


def broadcast_bytes(data: bytes | None, src: int, group=None, device=None) -> bytes:
    """Global rank src's bytes on every rank of group, sent as uint8 tensors (its length, then
    its content), never pickled. device: where the tensors live, the GPU under NCCL."""
    device = torch.device("cpu") if device is None else device
    me = dist.get_rank()
    size = torch.tensor([len(data) if me == src else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=src, group=group)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if me == src and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=src, group=group)
    return data if me == src else buf.cpu().numpy().tobytes()


def mirror_group(group) -> dist.ProcessGroup | None:
    """A second process group with the members of `group`: collective, every rank passes its
    own group of one kind (its TP group, its pipeline...). None when the groups have one
    member (nothing to communicate).

    For collectives that run beside the step's own on the same ranks (the weight sync's
    gather in a thread of its own): two threads must never drive one group, whose operations
    match across ranks only by their order. Every rank's member list is all-gathered as
    integers (nothing pickled) and `new_group` is called for each distinct list in the same
    order everywhere, as it must be."""
    ranks = dist.get_process_group_ranks(group)
    size, world = len(ranks), dist.get_world_size()
    if size == 1:
        return None
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mine = torch.tensor(ranks, dtype=torch.int64, device=device)
    every = torch.empty(world * size, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(every, mine)
    lists = sorted({tuple(r) for r in every.view(world, size).tolist()})
    out = None
    for members in lists:  # every rank creates every group, in one order
        g = dist.new_group(list(members))
        if dist.get_rank() in members:
            out = g
    return out


def global_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """A barrier over the default process group (nothing without one)."""
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: MASTER_PORT of a process group started here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_parallel() -> None:
    """Tear down megatron groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class OptimizerSettings:
    """Adam settings for megatron's (distributed) optimizer."""

    lr: float = 1e-6
    """Learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def problems(self, prefix: str = "optimizer.") -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"{prefix}lr={self.lr!r}: must be > 0")
        if self.clip_grad < 0:
            out.append(f"{prefix}clip_grad={self.clip_grad!r}: must be >= 0 (0: no clipping)")
        return out


def wrap_for_training(model, parallel: ParallelConfig, opt: OptimizerSettings | None = None):
    """Wrap this rank's GPTModel in megatron's DDP (grad buffers, DP reduce-scatter) and build
    the distributed optimizer over it. Returns (ddp_model, optimizer).

    Run steps with megatron's schedules (`get_forward_backward_func`) then
    `optimizer.step()`; `ddp_model.zero_grad_buffer()` and `optimizer.zero_grad()` before each.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = opt or OptimizerSettings()
    config = model.config
    from megatron_agpo.backends import megatron_fusions

    fusions = megatron_fusions()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # On CUDA the gradient buckets reduce during the backward and the updated parameters
        # gather during the next forward; on CPU (gloo) both stay synchronous.
        overlap_grad_reduce=fusions.overlap_grad_reduce,
        overlap_param_gather=fusions.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        # FP8 weight copies all-gathered in FP8 (model.fp8_param_gather).
        fp8_param_gather=bool(getattr(config, "fp8_param", False)),
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # The schedules call this after the last backward: DP grad reduce, tied-embedding and
    # layer-norm (sequence-parallel) grad all-reduces.
    config.finalize_model_grads_func = finalize_model_grads
    if fusions.overlap_grad_reduce:
        # The schedules hold the bucket reductions back until the last micro-batch's backward
        # (no_sync), then launch them as buckets fill (start_grad_sync), as Megatron-LM does.
        config.no_sync_func = ddp.no_sync
        config.grad_sync_func = ddp.start_grad_sync
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=detect().cuda)
    return ddp, optimizer
