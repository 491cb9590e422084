"""The plan: a run's layout (read from the same TrainConfig the trainer reads) and its memory
per GPU, verdict and step time on a cluster; and the search over layouts that fit."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_agpo.models.config import ModelConfig
from megatron_agpo.plan import memory as mem
from megatron_agpo.plan import steptime as st
from megatron_agpo.plan.cluster import GIB, ClusterSection, GpuSpec

ARCHS_DIR = Path(__file__).resolve().parent / "archs"
ENGINE_RESERVE_GIB = 2.0
"""Engine memory besides weights and KV cache: the profiling forward's activations, sampler
buffers, CUDA graphs."""
FP8_TRAIN_SPEEDUP = 1.2
"""Training and log-prob compute with FP8 linear layers, relative to BF16: the peers' measured
end-to-end 15-25% (not the 2x of the FP8 peak)."""
CHAR_VOCAB = 100
"""The tiny model's character tokenizer (megatron_agpo.data.char_tokenizer: 4 specials + 96)."""


# ----------------------------------------------------------------------------- inputs
@dataclass
class Layout:
    """Everything the estimate depends on, read from a TrainConfig (`from_config`)."""

    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    vp: int
    cp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str
    micro_batch: int
    token_budget: int
    packing: bool
    params_dtype: str
    fp8: str
    offload_optimizer: bool
    rollout_mode: str
    engines: int
    engine_tp: int
    engine_memory_fraction: float
    engine_dtype: str
    engine_quantization: str
    engine_sleeps_in_training: bool
    engines_on_own_gpus: bool
    """rollout.engine.launch=external: the engines run on GPUs of their own (other nodes), not
    beside the trainer's ranks."""
    enforce_eager: bool
    sync_channel: str
    context_len: int
    prompts: int
    samples_per_prompt: int
    max_new_tokens: int
    prompt_mean: int
    response_mean: int
    response_max: int
    recompute_old_logp: bool
    reference_model: bool
    ppo_epochs: int
    mini_batches: int
    ep: int = 1
    """parallel.expert_parallel: a MoE model's experts split over this many ranks."""
    etp: int = 0
    """Expert tensor parallelism (0: 1, what the trainer builds: every expert whole on its EP
    rank, megatron_agpo.parallel)."""
    router_replay: bool = False
    """model.router_replay=rollout: the engine's expert choices kept for the trainer."""
    max_staleness: int = 0
    """trainer.max_staleness: >= 1 overlaps generation with training (engines on GPUs of
    their own)."""
    background_sync: bool = False
    """trainer.background_sync as the trainer resolves it (null: on with overlap and
    rollout.partial=finish): the refit runs beside the next step's log-probs and first
    mini-batch."""

    @property
    def expert_tp(self) -> int:
        return self.etp or 1

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel ranks: what shards a MoE model's expert optimizer state."""
        return max(1, self.world // (self.pp * self.ep * self.expert_tp))

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def rollout_gpus(self) -> int:
        """GPUs the engines use beyond the trainer's (0 when they share the trainer's)."""
        return self.engines * self.engine_tp if self.engines_on_own_gpus else 0

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def samples(self) -> int:
        return self.prompts * self.samples_per_prompt

    @classmethod
    def from_config(cls, cfg) -> Layout:
        """The layout of a TrainConfig (megatron_agpo.train.load_config) and its cluster."""
        from megatron_agpo.trainer.config import background_sync_on

        c, p, r, t = cfg.cluster, cfg.parallel, cfg.rollout, cfg.trainer
        e = r.engine
        fp8 = getattr(cfg.model, "fp8", "none") or "none"
        # parallel.context_parallel is the trainer's; cluster.context_parallel sizes it where
        # the config leaves it at 1 (before the trainer ran CP).
        cp = getattr(p, "context_parallel", 1)
        return cls(
            nodes=c.nodes,
            gpus_per_node=c.gpus_per_node,
            tp=p.tensor_parallel,
            pp=p.pipeline_parallel,
            vp=c.virtual_pipeline,
            cp=cp if cp > 1 else c.context_parallel,
            sequence_parallel=p.sequence_parallel,
            distributed_optimizer=p.use_distributed_optimizer,
            recompute=c.recompute,
            micro_batch=t.micro_batch_size,
            token_budget=t.token_budget,
            # auto packs with Transformer Engine's attention, the GPU path the plan is for.
            packing=True if t.packing is None else t.packing,
            params_dtype=cfg.model.params_dtype,
            fp8=str(fp8),
            offload_optimizer=c.offload_optimizer,
            rollout_mode=r.mode,
            engines=e.num_replicas if r.mode == "replicas" else 1,
            engine_tp=e.tensor_parallel_size,
            engine_memory_fraction=e.gpu_memory_utilization,
            engine_dtype=e.dtype,
            engine_quantization=str(getattr(e, "quantization", "") or ""),
            # The loop puts the colocated engine to sleep while the trainer works (weights
            # offloaded, KV cache freed); replicas keep their memory.
            engine_sleeps_in_training=r.mode == "colocated" and e.enable_sleep_mode,
            engines_on_own_gpus=r.mode == "replicas"
            and getattr(e, "launch", "spawn") == "external",
            enforce_eager=e.enforce_eager,
            sync_channel=e.sync_channel,
            context_len=e.max_model_len,
            prompts=cfg.data.prompts_per_step,
            samples_per_prompt=r.n,
            max_new_tokens=r.max_new_tokens,
            prompt_mean=c.prompt_tokens_mean,
            response_mean=c.response_tokens_mean or max(1, r.max_new_tokens // 2),
            response_max=c.response_tokens_max or r.max_new_tokens,
            recompute_old_logp=t.old_logp == "recompute",
            reference_model=cfg.algorithm.loss.kl_coef != 0.0,
            ppo_epochs=t.ppo_epochs,
            mini_batches=t.mini_batches,
            ep=getattr(p, "expert_parallel", 1),
            etp=getattr(p, "expert_tensor_parallel", 0) or 0,
            router_replay=getattr(cfg.model, "router_replay", "off") == "rollout",
            max_staleness=getattr(t, "max_staleness", 0),
            background_sync=background_sync_on(t, r),
        )

    def overrides(self) -> list[str]:
        """Hydra overrides that give this layout's trainer-side choices."""
        out = [
            f"parallel.tensor_parallel={self.tp}",
            f"parallel.pipeline_parallel={self.pp}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"trainer.micro_batch_size={self.micro_batch}",
            f"rollout.engine.tensor_parallel_size={self.engine_tp}",
            f"rollout.engine.gpu_memory_utilization={self.engine_memory_fraction}",
        ]
        if self.rollout_mode == "replicas":
            out.append(f"rollout.engine.num_replicas={self.engines}")
        return out

    def validate(self, arch: ModelConfig, gpu: GpuSpec) -> None:
        """Raise ValueError naming the setting that cannot run at all (before any estimate)."""
        mp = self.tp * self.pp * self.cp
        if self.world % mp:
            raise ValueError(
                f"{self.nodes} x {self.gpus_per_node} GPUs do not divide into TP x PP x CP = "
                f"{self.tp} x {self.pp} x {self.cp}"
            )
        arch.validate(tensor_parallel=self.tp, pipeline_parallel=self.pp)
        experts = getattr(arch, "num_experts", 0)
        if self.ep > 1 and not experts:
            raise ValueError(f"parallel.expert_parallel={self.ep}: the model has no experts")
        if experts and experts % self.ep:
            raise ValueError(
                f"parallel.expert_parallel={self.ep} does not divide the model's {experts} experts"
            )
        if experts and (self.world // self.pp) % (self.ep * self.expert_tp):
            raise ValueError(
                f"parallel.expert_parallel={self.ep} x expert TP {self.expert_tp} does not "
                f"divide the {self.world // self.pp} ranks of a pipeline stage"
            )
        if arch.num_layers % (self.pp * self.vp):
            raise ValueError(
                f"num_layers={arch.num_layers} does not split into PP x virtual_pipeline = "
                f"{self.pp} x {self.vp}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
        if arch.num_attention_heads % self.engine_tp:
            raise ValueError(
                f"rollout.engine.tensor_parallel_size={self.engine_tp} does not divide "
                f"{arch.num_attention_heads} attention heads"
            )
        if self.fp8 != "none" and gpu.fp8_tflops <= 0:
            raise ValueError(f"model.fp8={self.fp8}: {gpu.name} has no FP8 tensor cores")
        if self.context_len <= self.max_new_tokens:
            raise ValueError(
                f"rollout.engine.max_model_len={self.context_len} leaves no room for a prompt "
                f"beside rollout.max_new_tokens={self.max_new_tokens}"
            )


def resolve_arch(cfg) -> tuple[ModelConfig, str]:
    """The architecture to plan for and where it came from (see ClusterSection.model_config);
    its params_dtype is the training dtype (model.params_dtype), as the trainer builds it."""
    pointer, hf = cfg.cluster.model_config, cfg.model.hf_path
    known = sorted(p.stem for p in ARCHS_DIR.glob("*.json"))
    if pointer:
        path = Path(pointer).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            path = ARCHS_DIR / f"{pointer}.json"
        if not path.exists():
            raise ValueError(
                f"cluster.model_config={pointer!r}: no such config.json, and not one of "
                f"{', '.join(known)}"
            )
    elif hf:
        path = Path(hf).expanduser() / "config.json"
        if not path.exists():
            path = ARCHS_DIR / f"{Path(hf).name}.json"
        if not path.exists():
            raise ValueError(
                f"model.hf_path={hf!r} has no config.json on this machine and "
                f"megatron_agpo/plan/archs/ has no {Path(hf).name}.json: set "
                f"cluster.model_config to a config.json or one of {', '.join(known)}"
            )
    else:
        m = cfg.model
        arch = ModelConfig(
            hidden_size=m.tiny_hidden,
            ffn_hidden_size=m.tiny_ffn,
            num_layers=m.tiny_layers,
            num_attention_heads=m.tiny_heads,
            num_query_groups=max(1, m.tiny_heads // 2),
            head_dim=m.tiny_hidden // m.tiny_heads,
            vocab_size=CHAR_VOCAB,
            max_position_embeddings=m.tiny_max_len,
            params_dtype=m.params_dtype,
        )
        return arch, "the tiny model (model.tiny_*)"
    arch = ModelConfig.from_hf(path, params_dtype=cfg.model.params_dtype)
    return arch, str(path)


# ----------------------------------------------------------------------------- results
@dataclass
class Memory:
    """Per GPU of one pipeline stage, bytes; `train` and `generate` are the two phases."""

    stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    reference: float
    rollout: float
    rollout_in_training: float
    overhead: float
    kv_cache_tokens: int
    router_replay: float = 0.0

    def phases(self, offload: bool) -> dict[str, dict[str, float]]:
        state = {"weights": self.weights, "reference": self.reference, "overhead": self.overhead}
        train = {
            **state,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
            "router_replay": self.router_replay,
            "rollout": self.rollout_in_training,
        }
        kept = 0.0 if offload else 1.0
        gen = {
            **state,
            "gradients": kept * self.gradients,
            "optimizer": kept * self.optimizer,
            "rollout": self.rollout,
        }
        return {"training": train, "generation": gen}


@dataclass
class Plan:
    """What `agpo-plan` reports (`to_json` gives the documented keys)."""

    model: str
    params: int
    gpu: GpuSpec
    layout: Layout
    fits: bool
    reason: str
    largest_term: str
    peak_phase: str
    stage: int
    memory_gib: dict[str, float]
    memory_by_phase_gib: dict[str, float]
    kv_cache_tokens: int
    step_time_s: dict[str, float]
    tokens_per_s_per_gpu: float
    train_mfu: float
    assumptions: list[str] = field(default_factory=list)
    step_terms_s: dict[str, float] = field(default_factory=dict)
    """Each stage's time split into its terms (`stage.term`, seconds; `generation.decode_steps`
    is a count and the two `_s` decode entries the memory- and compute-bound times whose larger
    one the decode pays): what the comparison with peers reads term by term."""

    def to_json(self) -> dict:
        return {
            "fits": self.fits,
            "reason": self.reason,
            "largest_term": self.largest_term,
            "peak_phase": self.peak_phase,
            "most_loaded_stage": self.stage,
            "memory_gib": self.memory_gib,
            "memory_by_phase_gib": self.memory_by_phase_gib,
            "gpu_memory_gib": self.gpu.memory_gib,
            "kv_cache_tokens": self.kv_cache_tokens,
            "step_time_s": self.step_time_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "train_mfu": self.train_mfu,
            "step_terms_s": self.step_terms_s,
            "model": self.model,
            "params": self.params,
            "gpu": dataclasses.asdict(self.gpu),
            "layout": dataclasses.asdict(self.layout),
            "assumptions": self.assumptions,
        }


# ----------------------------------------------------------------------------- memory
def _activation_tokens(lay: Layout) -> tuple[int, int]:
    """(sequence length, rows) of the largest micro-batch, as the trainer builds it
    (trainer.packing / token_budget / micro_batch_size). Packed: one row of at most the
    budget's tokens (a sequence longer than the budget runs alone, up to the context length).
    Padded: rows padded to the longest, which can reach the context length; with a token
    budget, at most the budget."""
    s = lay.context_len
    if lay.token_budget and lay.packing:
        return max(s, lay.token_budget), 1
    if lay.token_budget:
        return s, max(1, lay.token_budget // s)
    if lay.packing:
        return s * lay.micro_batch, 1
    return s, lay.micro_batch


def _micro_batches(lay: Layout, mean_len: float, per_optimizer_step: bool) -> int:
    rows = lay.samples / (lay.dp * (lay.mini_batches if per_optimizer_step else 1))
    if lay.token_budget:
        return max(1, math.ceil(rows * mean_len / lay.token_budget))
    return max(1, math.ceil(rows / lay.micro_batch))


def stage_memory(lay: Layout, arch: ModelConfig, gpu: GpuSpec, c: ClusterSection, stage: int):
    """Memory terms on one GPU of pipeline stage `stage`."""
    sp = mem.stage_params(arch, lay.tp, lay.pp, stage, lay.ep, lay.expert_tp)
    state = mem.state_bytes_per_param(lay.params_dtype, lay.distributed_optimizer, lay.dp * lay.cp)
    # A MoE model's expert weights shard their optimizer state over the expert-DP ranks.
    e_state = mem.state_bytes_per_param(lay.params_dtype, lay.distributed_optimizer, lay.expert_dp)
    s, b = _activation_tokens(lay)
    moe = {}
    if _is_moe(arch):
        moe = dict(moe_topk=arch.moe_router_topk, moe_ffn=arch.moe_ffn_hidden_size,
                   num_experts=arch.num_experts, etp=lay.expert_tp)  # fmt: skip
    layer = mem.layer_activation_bytes(
        s, b, arch.hidden_size, arch.num_attention_heads, lay.tp, lay.sequence_parallel,
        lay.recompute, ffn=arch.ffn_hidden_size, kv_heads=arch.num_query_groups, swiglu=True,
        dropout=False, flash_attention=c.flash_attention, cp=lay.cp, **moe,
    )  # fmt: skip
    # Activations are 16-bit in the formula; float32 training doubles them.
    act_scale = mem.DTYPE_BYTES[lay.params_dtype] / 2
    m = _micro_batches(lay, lay.prompt_mean + lay.response_mean, per_optimizer_step=True)
    in_flight = mem.pipeline_in_flight(lay.pp, lay.vp, m) if stage == 0 else 1.0
    # The first stage also keeps the embedding output of each micro-batch in flight.
    acts = act_scale * in_flight * (sp.layers * layer + (2 * s * b * arch.hidden_size / lay.cp
                                                          / (lay.tp if lay.sequence_parallel else 1)
                                                          if stage == 0 else 0))  # fmt: skip
    last = stage == lay.pp - 1
    out_bytes = mem.DTYPE_BYTES[lay.params_dtype]
    logits = (
        mem.logits_bytes(s * b // lay.cp, arch.padded_vocab_size, lay.tp, out_bytes, fused=True)
        if last
        else 0.0
    )
    engine_bytes = 1 if lay.engine_quantization == "fp8" else _engine_dtype_bytes(lay, arch)
    total = mem.total_params(arch)
    engine_weights = total * engine_bytes / lay.engine_tp
    share = lay.engine_memory_fraction * gpu.memory_gib * GIB
    kv_bytes = _engine_dtype_bytes(lay, arch)
    kv_tokens = (share - engine_weights - ENGINE_RESERVE_GIB * GIB) / mem.kv_bytes_per_token(
        arch, lay.engine_tp, kv_bytes
    )
    replay = 0.0
    if lay.router_replay and _is_moe(arch):
        replay = mem.router_replay_bytes(s * b / lay.cp, sp.layers, arch.moe_router_topk)
    return Memory(
        stage=stage,
        weights=sp.total * state.weights,
        gradients=sp.total * state.gradients,
        optimizer=(sp.total - sp.experts) * state.optimizer + sp.experts * e_state.optimizer,
        router_replay=replay,
        activations=acts,
        logits=logits,
        reference=sp.total * mem.DTYPE_BYTES[lay.params_dtype] if lay.reference_model else 0.0,
        rollout=0.0 if lay.engines_on_own_gpus else share,
        rollout_in_training=0.0
        if lay.engine_sleeps_in_training or lay.engines_on_own_gpus
        else share,
        overhead=c.overhead_gib * GIB,
        kv_cache_tokens=max(0, int(kv_tokens)),
    )


def _is_moe(arch: ModelConfig) -> bool:
    return getattr(arch, "num_experts", 0) > 0


def _train_efficiency(arch: ModelConfig, c: ClusterSection) -> float:
    """Share of the BF16 peak the trainer's passes reach: cluster.moe_matmul_efficiency for a
    mixture of experts, cluster.matmul_efficiency for a dense model."""
    return c.moe_matmul_efficiency if _is_moe(arch) else c.matmul_efficiency


def _engine_dtype_bytes(lay: Layout, arch: ModelConfig) -> int:
    if lay.engine_dtype in mem.DTYPE_BYTES:
        return mem.DTYPE_BYTES[lay.engine_dtype]
    return mem.DTYPE_BYTES.get(arch.extra.get("torch_dtype", arch.params_dtype), 2)


# ----------------------------------------------------------------------------- step time
def step_time(lay: Layout, arch: ModelConfig, gpu: GpuSpec, c: ClusterSection, kv_tokens: int):
    """Seconds per stage of one RL step, its tokens and the training FLOPs (see steptime)."""
    world, L, h = lay.world, arch.num_layers, arch.hidden_size
    seq = lay.prompt_mean + lay.response_mean
    # Trainer passes: a MoE model's at its own efficiency (small expert GEMMs, permutation,
    # router: see ClusterSection.moe_matmul_efficiency), a dense one's at the matmul one.
    peak = gpu.bf16_tflops * 1e12 * _train_efficiency(arch, c)
    if lay.fp8 != "none":
        peak *= FP8_TRAIN_SPEEDUP
    nvlink = gpu.intra_node_gb_s * c.link_efficiency
    net = gpu.inter_node_gb_s * c.link_efficiency
    tp_bw = nvlink if lay.tp <= lay.gpus_per_node else net
    dp_bw = nvlink if lay.tp * lay.cp * lay.dp <= lay.gpus_per_node else net
    pp_bw = nvlink if world <= lay.gpus_per_node else net
    fwd_seq = st.forward_flops(arch, seq)
    fwd = lay.samples * fwd_seq
    # Rows each data-parallel rank trains on per mini-batch (and in a log-prob pass): with more
    # ranks than rows, some idle, which is where adding GPUs stops paying.
    rows = math.ceil(lay.samples / (lay.mini_batches * lay.dp)) * lay.mini_batches
    rows_f = math.ceil(lay.samples / lay.dp)
    mp_peak = lay.tp * lay.pp * lay.cp * peak  # one model replica's FLOP/s
    tokens_group = rows * seq / lay.cp  # tokens through each TP group
    act_bytes = mem.DTYPE_BYTES[lay.params_dtype]

    def tp_comm(collectives_per_layer: int) -> float:
        vol = collectives_per_layer * (L / lay.pp) * tokens_group * h * act_bytes
        return st.ring_allreduce_s(vol, lay.tp, tp_bw)

    # MoE: every layer's token dispatch and combine are all-to-alls over the EP group (2 per
    # forward, 2 more in the backward), each rank sending its tokens' top-k copies.
    # Megatron orders expert ranks expert-TP first, then EP: an EP group of consecutive ranks.
    # The MoE efficiency (cluster.moe_matmul_efficiency) is a measured whole pass with its EP
    # group inside one node, all-to-alls included: what is added here is what an EP group
    # spanning nodes costs beyond the same all-to-alls over NVLink (nothing inside a node).
    ep_across = lay.expert_tp * lay.ep > lay.gpus_per_node

    def a2a(per_layer: int) -> float:
        if not _is_moe(arch) or lay.ep == 1 or not ep_across:
            return 0.0
        tokens_rank = tokens_group / (lay.tp if lay.sequence_parallel else 1)
        vol = tokens_rank * arch.moe_router_topk * h * act_bytes
        calls = per_layer * (L / lay.pp)
        extra = st.all_to_all_s(vol, lay.ep, net) - st.all_to_all_s(vol, lay.ep, nvlink)
        return calls * extra + calls * m_calls * c.collective_latency_us * 1e-6

    # Context parallelism: Transformer Engine's ring passes each rank's K and V chunk to the
    # others in the forward, and K, V and their gradients back in the backward.
    cp_bw = nvlink if lay.tp * lay.cp <= lay.gpus_per_node else net
    kv_dim = arch.num_query_groups * arch.head_dim

    def cp_comm(passes: int) -> float:
        if lay.cp == 1:
            return 0.0
        vol = rows * seq * 2 * kv_dim * act_bytes / lay.tp * (lay.cp - 1) / lay.cp
        return passes * (L / lay.pp) * vol / (cp_bw * 1e9)

    def pp_comm(directions: int) -> float:
        shard = lay.tp if lay.sequence_parallel else 1
        return 0.0 if lay.pp == 1 else directions * tokens_group * h * act_bytes / shard / (
            pp_bw * 1e9)  # fmt: skip

    # Training: ppo_epochs passes; an optimizer step per mini-batch.
    train_fwds = st.train_flops_factor(lay.recompute)
    compute = lay.ppo_epochs * train_fwds * rows * fwd_seq / mp_peak
    m = _micro_batches(lay, seq, per_optimizer_step=True)
    m_calls = m * lay.mini_batches
    bubble = compute * st.pipeline_bubble(lay.pp, lay.vp, m)
    colls = 6 if lay.recompute == "full" else 4
    stage_p = mem.stage_params(arch, lay.tp, lay.pp, 0).total
    w_bytes = mem.DTYPE_BYTES[lay.params_dtype]
    if lay.distributed_optimizer:  # reduce-scatter fp32 grads, all-gather updated weights
        dp_s = st.ring_gather_s(stage_p * 4, lay.dp * lay.cp, dp_bw) + st.ring_gather_s(
            stage_p * w_bytes, lay.dp * lay.cp, dp_bw
        )
    else:
        dp_s = st.ring_allreduce_s(stage_p * 4, lay.dp * lay.cp, dp_bw)
    updates = lay.ppo_epochs * lay.mini_batches
    if _is_moe(arch):
        # Experts live on EP x expert-TP ranks: their gradients reduce over expert-DP only.
        e_p = mem.stage_params(arch, lay.tp, lay.pp, 0, lay.ep, lay.expert_tp).experts
        # The rest of the stage (attention, router, norms, embedding / output layer) reduces
        # over DP x CP: the stage's parameters less all of its experts (stage_p counts every
        # expert of the stage, as at EP 1), not less this GPU's share of them.
        dense_p = stage_p - mem.stage_params(arch, lay.tp, lay.pp, 0).experts
        edp, e_bw = lay.expert_dp, (nvlink if lay.world <= lay.gpus_per_node else net)
        if lay.distributed_optimizer:
            dp_s = st.ring_gather_s(dense_p * 4, lay.dp * lay.cp, dp_bw) + st.ring_gather_s(
                dense_p * w_bytes, lay.dp * lay.cp, dp_bw)  # fmt: skip
            dp_s += st.ring_gather_s(e_p * 4, edp, e_bw) + st.ring_gather_s(e_p * w_bytes, edp,
                                                                            e_bw)  # fmt: skip
        else:
            dp_s = st.ring_allreduce_s(dense_p * 4, lay.dp * lay.cp, dp_bw)
            dp_s += st.ring_allreduce_s(e_p * 4, edp, e_bw)
    a2a_calls = 6 if lay.recompute == "full" else 4
    terms = {
        "train.compute": compute,
        "train.pipeline_bubble": bubble,
        "train.tp": lay.ppo_epochs * tp_comm(colls),
        "train.pp": lay.ppo_epochs * pp_comm(2),
        "train.all_to_all": lay.ppo_epochs * a2a(a2a_calls),
        "train.cp": lay.ppo_epochs * cp_comm(3),
        "train.dp": updates * dp_s,
    }
    train = sum(v for k, v in terms.items() if k.startswith("train."))

    # Log-prob passes: forward only.
    passes = int(lay.recompute_old_logp) + int(lay.reference_model)
    f_compute = rows_f * fwd_seq / mp_peak
    m_f = _micro_batches(lay, seq, per_optimizer_step=False)
    terms.update({
        "logprobs.compute": passes * f_compute,
        "logprobs.pipeline_bubble": passes * f_compute * st.pipeline_bubble(lay.pp, 1, m_f),
        "logprobs.comm": passes * (tp_comm(2) + pp_comm(1) + a2a(2) + cp_comm(1)),
    })  # fmt: skip
    logprobs = sum(v for k, v in terms.items() if k.startswith("logprobs."))

    # Generation: engines in parallel, each over its share of the prompts.
    e_bytes = 1 if lay.engine_quantization == "fp8" else _engine_dtype_bytes(lay, arch)
    total_p = mem.total_params(arch)
    seqs = math.ceil(lay.samples / lay.engines)
    prompts = math.ceil(lay.prompts / lay.engines)
    kv_tok = mem.kv_bytes_per_token(arch, lay.engine_tp, _engine_dtype_bytes(lay, arch))
    need = seqs * (lay.prompt_mean + lay.response_mean)
    waves = max(1.0, need / max(1, kv_tokens))  # continuous batching over a full KV cache
    r_mean = lay.response_mean
    kv_read = seqs * kv_tok * (lay.prompt_mean * r_mean + r_mean**2 / 2)
    gen_peak = gpu.bf16_tflops * 1e12 * c.matmul_efficiency
    overhead_ms = c.decode_step_overhead_ms or (8.0 if lay.enforce_eager else 2.0)
    latency = 2 * L * c.collective_latency_us * 1e-6 if lay.engine_tp > 1 else 0.0
    step_weights = total_p
    if _is_moe(arch):
        # A decode step reads the experts its batch's tokens route to (all of them from a few
        # hundred sequences on), and every other weight.
        expert_p = mem.stage_params(arch, 1, 1, 0).experts
        running = seqs / waves
        touched = st.experts_touched(arch.num_experts, arch.moe_router_topk, running)
        step_weights = total_p - expert_p + expert_p * touched / arch.num_experts
    steps = lay.response_max * waves
    decode_args = dict(
        steps=steps,
        weight_bytes=step_weights * e_bytes / lay.engine_tp,
        kv_bytes_read=kv_read,
        flops=2 * st.matmul_params(arch) * seqs * r_mean / lay.engine_tp,
        hbm_gb_s=gpu.hbm_gb_s * c.hbm_efficiency,
        peak_tflops=gen_peak / 1e12,
        step_overhead_s=overhead_ms * 1e-3,
        step_latency_s=latency,
    )
    decode = st.decode_seconds(**decode_args)
    # vLLM prefills a prompt once for its n samples (prefix caching).
    prefill = prompts * st.forward_flops(arch, lay.prompt_mean) / (lay.engine_tp * gen_peak)
    generation = prefill + decode
    hbm = gpu.hbm_gb_s * c.hbm_efficiency * 1e9
    fixed = steps * (overhead_ms * 1e-3 + latency)
    weight_reads = steps * decode_args["weight_bytes"]
    reads = weight_reads + kv_read
    terms.update({
        "generation.prefill": prefill,
        # decode = max(weight + KV reads, compute) + the fixed cost per step; the reads are
        # split here in proportion (their sum is the memory-bound time whenever memory binds).
        "generation.decode_weights": (decode - fixed) * weight_reads / max(1.0, reads),
        "generation.decode_kv": (decode - fixed) * kv_read / max(1.0, reads),
        "generation.decode_step_overhead": steps * overhead_ms * 1e-3,
        "generation.decode_tp_latency": steps * latency,
        "generation.decode_steps": steps,
        "generation.decode_memory_s": reads / hbm,
        "generation.decode_compute_s": decode_args["flops"] / gen_peak,
    })  # fmt: skip

    # Refit: gather the weights to trainer rank 0, then into the engines.
    weight_bytes = total_p * w_bytes
    gather = st.ring_gather_s(weight_bytes / lay.pp, lay.tp, tp_bw)
    if _is_moe(arch) and lay.ep > 1:  # the experts, spread over the EP ranks
        e_bytes_all = mem.stage_params(arch, 1, 1, 0).experts * w_bytes
        gather += st.ring_gather_s(e_bytes_all / lay.pp, lay.ep, nvlink if not ep_across else net)
    if lay.pp > 1:
        gather += weight_bytes * (lay.pp - 1) / lay.pp / (pp_bw * 1e9)
    if lay.rollout_mode == "colocated":
        send = weight_bytes / (gpu.hbm_gb_s * c.hbm_efficiency * 1e9)
    elif lay.sync_channel == "collective":
        cross = world > lay.gpus_per_node or lay.engines_on_own_gpus
        send = weight_bytes / ((net if cross else nvlink) * 1e9)
    else:
        send = weight_bytes * lay.engines / (c.host_copy_gb_s * 1e9)
    refit = gather + send
    terms.update({"refit.gather": gather, "refit.send": send})

    times = {"generation": generation, "logprobs": logprobs, "train": train, "refit": refit}
    times["total"] = sum(times.values())
    if lay.max_staleness >= 1 and lay.engines_on_own_gpus:
        times["sequential"] = times["total"]
        # Background sync: the next step's log-probs and first mini-batch (its forward and
        # backward) run beside the refit; its first optimizer step waits for it.
        hidden = 0.0
        if lay.background_sync:
            hidden = logprobs + train / (lay.ppo_epochs * lay.mini_batches)
        times["total"] = st.step_with_overlap(generation, logprobs + train, refit, hidden)
    model_flops = lay.ppo_epochs * 3 * fwd
    mfu = model_flops / (train * world * gpu.bf16_tflops * 1e12) if train > 0 else 0.0
    tokens = lay.samples * seq
    return times, tokens, mfu, terms


# ----------------------------------------------------------------------------- plan
TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "router_replay",
         "reference", "rollout")  # fmt: skip


def make_plan(lay: Layout, arch: ModelConfig, c: ClusterSection, model_name: str = "") -> Plan:
    """Memory of the most loaded stage, the verdict and the step time of one layout."""
    gpu = c.spec()
    lay.validate(arch, gpu)
    stages = {0, lay.pp - 1}
    best = None
    for stage in sorted(stages):
        m = stage_memory(lay, arch, gpu, c, stage)
        phases = m.phases(lay.offload_optimizer)
        totals = {k: sum(v.values()) for k, v in phases.items()}
        peak_phase = max(totals, key=totals.get)
        if best is None or totals[peak_phase] > best[3][best[2]]:
            best = (m, phases, peak_phase, totals)
    m, phases, peak_phase, totals = best
    terms = phases[peak_phase]
    gib = {k: terms.get(k, 0.0) / GIB for k in (*TERMS, "overhead")}
    gib["total"] = totals[peak_phase] / GIB
    largest = max(TERMS, key=lambda k: gib[k])
    fits = gib["total"] <= gpu.memory_gib and m.kv_cache_tokens > 0
    if m.kv_cache_tokens <= 0:
        reason = (
            f"DOES NOT FIT: the engine's weights leave no KV cache in its share "
            f"({lay.engine_memory_fraction:.2f} x {gpu.memory_gib:.1f} GiB): raise "
            "rollout.engine.gpu_memory_utilization or rollout.engine.tensor_parallel_size"
        )
        largest = "rollout"
    elif fits:
        reason = (
            f"FITS: peak {gib['total']:.1f} of {gpu.memory_gib:.1f} GiB per GPU during "
            f"{peak_phase} (stage {m.stage}); largest term: {largest} {gib[largest]:.1f} GiB"
        )
    else:
        reason = (
            f"DOES NOT FIT: {gib['total']:.1f} GiB per GPU during {peak_phase} (stage "
            f"{m.stage}) > {gpu.memory_gib:.1f} GiB; largest term: {largest} "
            f"{gib[largest]:.1f} GiB"
        )
    if lay.engines * lay.engine_tp > lay.world and not lay.engines_on_own_gpus:
        # Memory above is per GPU with one engine share; more engines than GPUs is a second,
        # separate reason not to fit.
        fits = False
        reason += (
            f"; and {lay.engines} engines x TP {lay.engine_tp} need "
            f"{lay.engines * lay.engine_tp} GPUs, the cluster has {lay.world}"
        )
    times, tokens, mfu, terms = step_time(lay, arch, gpu, c, m.kv_cache_tokens)
    return Plan(
        model=model_name,
        params=mem.total_params(arch),
        gpu=gpu,
        layout=lay,
        fits=fits,
        reason=reason,
        largest_term=largest,
        peak_phase=peak_phase,
        stage=m.stage,
        memory_gib=gib,
        memory_by_phase_gib={k: v / GIB for k, v in totals.items()},
        kv_cache_tokens=m.kv_cache_tokens,
        step_time_s=times,
        tokens_per_s_per_gpu=tokens / (times["total"] * (lay.world + lay.rollout_gpus)),
        train_mfu=mfu,
        step_terms_s=terms,
        assumptions=assumptions(lay, c, gpu, arch),
    )


def assumptions(
    lay: Layout, c: ClusterSection, gpu: GpuSpec, arch: ModelConfig | None = None
) -> list[str]:
    """Every assumption the numbers rest on, in words."""
    overhead = c.decode_step_overhead_ms or (8.0 if lay.enforce_eager else 2.0)
    out = [
        f"GPU {gpu.name}: {gpu.memory_gib} GiB, {gpu.bf16_tflops:g} TFLOP/s BF16 dense, "
        f"{gpu.fp8_tflops:g} FP8, {gpu.hbm_gb_s:g} GB/s HBM, {gpu.intra_node_gb_s:g} GB/s NVLink "
        f"and {gpu.inter_node_gb_s:g} GB/s network per GPU (one direction)",
        f"efficiencies: training and log-prob passes {_train_efficiency(arch, c):g} of the BF16 "
        "peak"
        + (
            " (cluster.moe_matmul_efficiency: Megatron-Bridge's measured Qwen3-30B-A3B "
            "pretraining on H100, its all-to-alls inside a node included)"
            if arch is not None and _is_moe(arch)
            else ""
        )
        + f", prefill {c.matmul_efficiency:g}, decode {c.hbm_efficiency:g} of HBM bandwidth, "
        f"collectives {c.link_efficiency:g} of link bandwidth; nothing overlaps",
        f"sequences: prompt {lay.prompt_mean} tokens on average (cluster.prompt_tokens_mean), "
        f"response {lay.response_mean} on average and {lay.response_max} for the longest, "
        "which sets the decode steps; "
        + (
            "micro-batches packed (no padding computed)"
            if lay.packing
            else "padding inside micro-batches not counted"
        ),
        f"activations: the largest micro-batch, {_activation_tokens(lay)[1]} row(s) of "
        f"{_activation_tokens(lay)[0]} tokens ({'packed' if lay.packing else 'padded'}); "
        f"{'flash attention (no [s, s] scores)' if c.flash_attention else 'materialised scores'}"
        f"; recompute {lay.recompute}; 16-bit activations ({lay.params_dtype} training scales "
        "them); first stage holds the 1F1B warm-up's micro-batches",
        "loss path: the fused vocab-parallel loss (logits shard + one float32 buffer)",
        f"rollout: {lay.engines} engine(s) x TP {lay.engine_tp}, each GPU hosting an engine "
        f"gives it {lay.engine_memory_fraction:g} of its memory (weights, "
        f"{ENGINE_RESERVE_GIB:g} GiB reserve, KV cache); "
        + (
            f"on {lay.rollout_gpus} GPUs of their own (launch=external), counted in tokens/s/GPU"
            if lay.engines_on_own_gpus
            else "asleep during training (colocated, sleep mode)"
            if lay.engine_sleeps_in_training
            else "kept during training"
        ),
        f"decode: {overhead:g} ms per step of scheduling and launches"
        f"{' (enforce_eager)' if lay.enforce_eager else ''}, "
        f"{c.collective_latency_us:g} us per TP all-reduce; prompts prefilled once per group",
        f"overhead {c.overhead_gib:g} GiB per GPU (CUDA context, NCCL, fragmentation)",
        "reward scoring, dynamic-sampling extra rounds and evaluation are not counted",
    ]
    if arch is not None and _is_moe(arch):
        across = lay.ep * lay.expert_tp > lay.gpus_per_node
        replay = (
            f"; router replay: int64 [tokens, layers, {arch.moe_router_topk}] routes per "
            "micro-batch on the GPU"
        )
        out.append(
            f"MoE: {arch.num_experts} experts, top-{arch.moe_router_topk}, over EP {lay.ep} x "
            f"expert TP {lay.expert_tp} (their optimizer state over {lay.expert_dp} expert-DP "
            "ranks); FLOPs of the top-k experts only, at the MoE efficiency (no dropped "
            "tokens); 2 all-to-alls per layer per forward (dispatch, combine), 2 more per "
            "backward, counted only for what an EP group spanning nodes adds over NVLink "
            f"({'here it spans nodes' if across else 'here inside a node: none'}); a decode "
            "step reads the experts its running batch touches, E(1 - (1 - k/E)^batch), the "
            "batch at its largest for every step" + (replay if lay.router_replay else "")
        )
    if lay.cp > 1:
        out.append(
            f"context parallelism {lay.cp}: activations and logits / CP, each rank's K and V "
            "passed round the CP ring (forward) and back with their gradients (backward), not "
            "overlapped with the attention; gradients reduced over DP x CP"
        )
    if lay.max_staleness >= 1:
        if not lay.engines_on_own_gpus:
            how = (
                "the engines share the trainer's GPUs, so nothing is gained: the stages are summed"
            )
        elif lay.background_sync:
            how = (
                "step = max(generation + refit, log-probs + train + the refit beyond log-probs "
                "+ the first mini-batch's passes) (trainer.background_sync: the refit runs "
                "beside the next step until its first optimizer step; the engines pause to "
                "load the weights); the same steady state for every k >= 1"
            )
        else:
            how = (
                "step = max(generation, log-probs + train) + refit (the engines pause to load "
                "the weights, the trainer waits for the sync); the same steady state for "
                "every k >= 1"
            )
        out.append(f"overlap (trainer.max_staleness={lay.max_staleness}): {how}")
    if lay.fp8 != "none":
        out.append(f"FP8 training: compute x{FP8_TRAIN_SPEEDUP} (peers' measured gain), "
                   "BF16 weights kept (no FP8 parameters)")  # fmt: skip
    planner_only = [
        n
        for n, v in (
            ("virtual pipeline", lay.vp > 1),
            ("context parallelism (a Transformer Engine GPU)", lay.cp > 1),
            ("recomputation", lay.recompute != "none"),
            ("optimizer offload", lay.offload_optimizer),
        )
        if v
    ]
    if planner_only:
        out.append(f"planner only (not run on this machine): {', '.join(planner_only)}")
    return out


def search(base: Layout, arch: ModelConfig, c: ClusterSection, top: int = 10) -> list[Plan]:
    """Layouts the trainer runs (TP, PP, sequence parallelism, micro-batch, engine TP and
    memory fraction, one engine share per GPU) that fit, fastest first."""
    world, gpus = base.world, base.gpus_per_node
    tps = [t for t in (1, 2, 4, 8) if t <= gpus]
    pps = [p for p in range(1, arch.num_layers + 1) if arch.num_layers % p == 0 and p <= 16]
    out = []
    for tp in tps:
        for pp in pps:
            if world % (tp * pp * base.cp):
                continue
            for mbs in (1, 2, 4):
                # Engines on their own GPUs keep their deployment; shared ones get one
                # share on every trainer GPU.
                etps = [base.engine_tp] if base.engines_on_own_gpus else tps
                for etp in etps:
                    for frac in (0.3, 0.4, 0.5, 0.6, 0.7):
                        engines = base.engines
                        if not base.engines_on_own_gpus:
                            engines = world // etp if base.rollout_mode == "replicas" else 1
                        lay = dataclasses.replace(
                            base, tp=tp, pp=pp, sequence_parallel=tp > 1, micro_batch=mbs,
                            engine_tp=etp, engine_memory_fraction=frac, engines=engines,
                        )  # fmt: skip
                        try:
                            p = make_plan(lay, arch, c)
                        except ValueError:
                            continue
                        if p.fits:
                            out.append(p)
    out.sort(key=lambda p: p.step_time_s["total"])
    return out[:top]
