"""Step time: FLOPs, bytes and collectives of each stage, as pure functions.

Compute-bound stages (training, log-prob passes, prefill) take FLOPs / (peak x matmul
efficiency); decode is bandwidth-bound (every decode step reads the engine's weights once and
the KV cache of every running sequence); collectives take ring volume / (link bandwidth x link
efficiency). Nothing overlaps: the trainer runs without gradient-reduce or TP-communication
overlap, and the stages of a step run one after another.
"""

from __future__ import annotations

from megatron_agpo.models.config import ModelConfig


def matmul_params(arch: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every layer's projections and the
    output layer (not the embedding lookup, norms or biases); for a MoE model the router and
    the token's top-k experts only."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    if getattr(arch, "num_experts", 0):
        mlp = arch.num_experts * h + arch.moe_router_topk * 3 * arch.moe_ffn_hidden_size * h
    else:
        mlp = 3 * arch.ffn_hidden_size * h
    per_layer = (q + 2 * kv) * h + h * q + mlp
    return arch.num_layers * per_layer + arch.padded_vocab_size * h


def forward_flops(arch: ModelConfig, seq_len: float) -> float:
    """FLOPs of one forward over a sequence of seq_len tokens: 2 per matmul weight per token,
    plus causal attention 2 S^2 d per layer (QK^T and AV, each S^2/2 d multiply-adds)."""
    d_attn = arch.num_attention_heads * arch.head_dim
    return 2 * matmul_params(arch) * seq_len + 2 * arch.num_layers * seq_len**2 * d_attn


def train_flops_factor(recompute: str) -> float:
    """Forwards' worth of FLOPs per training pass: forward + backward (2x) = 3, one more
    forward with full recomputation (selective recomputes only the attention core, counted as
    free here)."""
    return 4.0 if recompute == "full" else 3.0


def ring_allreduce_s(nbytes: float, n: int, gb_s: float) -> float:
    """Ring all-reduce of nbytes over n ranks at gb_s per direction."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / (gb_s * 1e9)


def ring_gather_s(nbytes: float, n: int, gb_s: float) -> float:
    """Ring reduce-scatter or all-gather of nbytes (the full size) over n ranks."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / (gb_s * 1e9)


def all_to_all_s(nbytes: float, n: int, gb_s: float) -> float:
    """An all-to-all in which each of n ranks holds nbytes and keeps 1/n of them: (n-1)/n of
    them leave over the link (the MoE token dispatch and combine)."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / (gb_s * 1e9)


def experts_touched(num_experts: int, topk: int, tokens: float) -> float:
    """Expected distinct experts a batch of `tokens` tokens routes to, each token choosing
    top-k of E uniformly: E (1 - (1 - k/E)^tokens). A decode step reads only those experts'
    weights; from a few hundred tokens on, all of them."""
    if num_experts <= 0:
        return 0.0
    return num_experts * (1 - (1 - topk / num_experts) ** max(0.0, tokens))


def step_with_overlap(
    generation: float, trainer_side: float, refit: float, hidden: float = 0.0
) -> float:
    """Step time when generation overlaps training (trainer.max_staleness >= 1, engines on
    GPUs of their own): the slower of two cycles. The engines generate, then pause to load
    the weights the trainer sends (generation + refit); the trainer runs its log-prob and
    training passes and waits for the part of the refit that its next step does not cover
    (`hidden`: with trainer.background_sync the sync runs beside the next step up to its
    first optimizer step, i.e. beside its log-probs and first mini-batch; 0: the sync
    blocks the trainer, and the step is max(generation, trainer_side) + refit). With k >= 1
    the steady state is the same for every k: a larger bound only absorbs the variance of
    the two sides."""
    return max(generation + refit, trainer_side + max(0.0, refit - hidden))


def pipeline_bubble(pp: int, vp: int, micro_batches: int) -> float:
    """Idle share added to a pipelined pass: (pp - 1) / (vp m) of the compute time (1F1B,
    interleaved with vp virtual stages)."""
    return 0.0 if pp == 1 else (pp - 1) / (vp * max(1, micro_batches))


def decode_seconds(
    steps: float,
    weight_bytes: float,
    kv_bytes_read: float,
    flops: float,
    hbm_gb_s: float,
    peak_tflops: float,
    step_overhead_s: float,
    step_latency_s: float,
) -> float:
    """Decode of one engine on one of its GPUs: every step reads the GPU's weight shard and
    pays a fixed overhead and the TP all-reduce latency; the KV reads and the FLOPs are totals
    over the whole generation (the memory terms add up, compute overlaps with them)."""
    memory = (steps * weight_bytes + kv_bytes_read) / (hbm_gb_s * 1e9)
    compute = flops / (peak_tflops * 1e12)
    return max(memory, compute) + steps * (step_overhead_s + step_latency_s)
