"""Memory per GPU: pure functions of an architecture and a layout, in bytes.

Sources of the accounting:
- weights, gradients, optimizer state: megatron-core's DDP and (distributed) optimizer as
  `megatron_agpo.parallel.wrap_for_training` builds them: gradients accumulate in a float32
  buffer (`grad_reduce_in_fp32=True`), Adam keeps two float32 moments, and float32 master
  weights when the parameters are not float32; the distributed optimizer shards moments and
  master weights over the data-parallel ranks. That is Megatron's published 18 bytes per
  parameter for BF16 without it and 6 + 12/DP with it.
- activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", arXiv 2205.05198, section 4), term by term, generalised to SwiGLU, GQA,
  no dropout and flash attention; with the paper's own assumptions (GeLU MLP of 4h, MHA,
  dropout, materialised softmax) it is exactly the paper's sbh(34 + 5as/h) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_agpo.models.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class StageParams:
    """Parameters one GPU holds for one pipeline stage (its TP shard)."""

    layers: int
    """Transformer layers on the stage."""
    layer_params: int
    """Parameters of those layers on this GPU (TP-sharded matrices, replicated norms)."""
    embedding: int
    """Input embedding rows on this GPU (first stage only)."""
    output: int
    """Output layer (and final norm) on this GPU (last stage only)."""
    norms: int
    """Of the above, RMSNorm weights (replicated on every TP rank). Transformer Engine's take
    the parameter dtype; megatron's local (CPU) spec keeps them in float32."""
    experts: int = 0
    """MoE: the stage's expert weights on this GPU (E / EP experts per layer, each split over
    the expert-TP ranks); their optimizer state shards over the expert-data-parallel ranks."""

    @property
    def total(self) -> int:
        return self.layer_params + self.embedding + self.output + self.experts


def layer_params(arch: ModelConfig, tp: int) -> int:
    """One transformer layer's parameters on one GPU of a TP group (megatron's GPT layer:
    fused QKV, output projection, SwiGLU fc1 (gate and up) and fc2, two RMSNorm weights
    replicated on every TP rank)."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    qkv = (q + 2 * kv) * h + ((q + 2 * kv) if arch.qkv_bias else 0)
    proj = h * q
    qk_norm = 2 * hd if arch.qk_layernorm else 0
    if getattr(arch, "num_experts", 0):
        # MoE layer: the experts are counted apart (expert_layer_params); the router's [E, h]
        # weight is replicated on every TP rank.
        return (qkv + proj) // tp + 2 * h + qk_norm + arch.num_experts * h
    mlp = 2 * arch.ffn_hidden_size * h + h * arch.ffn_hidden_size
    return (qkv + proj + mlp) // tp + 2 * h + qk_norm


def expert_layer_params(arch: ModelConfig, ep: int = 1, etp: int = 1) -> int:
    """One MoE layer's expert weights on one GPU: E / EP SwiGLU experts (fc1 gate and up,
    fc2), each split over `etp` expert-TP ranks; 0 for a dense model."""
    e = getattr(arch, "num_experts", 0)
    if not e:
        return 0
    return (e // ep) * 3 * arch.hidden_size * arch.moe_ffn_hidden_size // etp


def stage_params(
    arch: ModelConfig, tp: int, pp: int, stage: int, ep: int = 1, etp: int | None = None
) -> StageParams:
    """Parameters on one GPU of pipeline stage `stage` (0 = first, pp - 1 = last); MoE
    experts over `ep` expert-parallel x `etp` expert-TP ranks (megatron's default ETP = TP)."""
    layers = arch.num_layers // pp
    vocab = arch.padded_vocab_size * arch.hidden_size // tp
    first, last = stage == 0, stage == pp - 1
    embedding = vocab if first else 0
    # Tied embeddings share one tensor only when the first stage is also the last; otherwise
    # the last stage keeps its own copy (megatron all-reduces their gradients).
    output = (0 if (arch.tie_word_embeddings and first) else vocab) if last else 0
    output += arch.hidden_size if last else 0  # final norm
    norms = 2 * arch.hidden_size * layers + (arch.hidden_size if last else 0)
    experts = layers * expert_layer_params(arch, ep, tp if etp is None else etp)
    return StageParams(layers, layers * layer_params(arch, tp), embedding, output, norms, experts)


def total_params(arch: ModelConfig) -> int:
    """Parameters of the whole model (padded vocabulary, as megatron allocates it)."""
    return stage_params(arch, 1, 1, 0).total


def active_params(arch: ModelConfig) -> int:
    """Parameters one token passes through: a MoE model's top-k experts of every layer, not
    all of them (the whole model for a dense one)."""
    full = stage_params(arch, 1, 1, 0)
    if not getattr(arch, "num_experts", 0):
        return full.total
    per_expert = 3 * arch.hidden_size * arch.moe_ffn_hidden_size
    return full.total - full.experts + arch.num_layers * arch.moe_router_topk * per_expert


# ----------------------------------------------------------------------------- state
@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter on one GPU for the training state."""

    weights: float
    gradients: float
    optimizer: float
    """Adam moments plus master weights (float32), divided by DP when sharded."""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def state_bytes_per_param(
    params_dtype: str, distributed_optimizer: bool, dp: int, grad_fp32: bool = True
) -> StateBytes:
    """Megatron's accounting: bf16 weights + fp32 grads + fp32 master + fp32 Adam m, v = 2 + 4
    + 12 (18; 6 + 12/DP with the distributed optimizer); fp32 parameters need no master copy:
    4 + 4 + 8 (16; 8 + 8/DP). fp16 keeps fp16 gradients and an fp32 copy of them in the
    optimizer: 2 + 2 + 16 (4 + 16/DP)."""
    w = DTYPE_BYTES[params_dtype]
    if params_dtype == "float16" and not grad_fp32:
        g, opt = 2, 16
    else:
        g = 4 if grad_fp32 else w
        opt = 8 + (0 if params_dtype == "float32" else 4)
    return StateBytes(w, g, opt / dp if distributed_optimizer else opt)


# ----------------------------------------------------------------------------- activations
def layer_activation_bytes(
    s: int,
    b: int,
    h: int,
    a: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: str = "none",
    ffn: int | None = None,
    kv_heads: int | None = None,
    swiglu: bool = False,
    dropout: bool = True,
    flash_attention: bool = False,
    cp: int = 1,
    moe_topk: int = 0,
    moe_ffn: int = 0,
    num_experts: int = 0,
    etp: int | None = None,
) -> float:
    """Bytes one transformer layer keeps for the backward of one micro-batch, on one GPU
    (16-bit activations, 1-byte dropout masks).

    Korthikanti et al. 2022, section 4.1, per layer (s sequence, b micro-batch, h hidden,
    a heads): attention 11sbh + 5as^2 b, MLP 19sbh, two norms 4sbh: sbh(34 + 5as/h).
    With TP the 24 sbh of the attention and MLP interiors divide by t and the 10 sbh around
    them (norm inputs, QKV and fc1 inputs, dropout masks) do not: sbh(10 + 24/t + 5as/(ht));
    sequence parallelism divides those too: sbh(34 + 5as/h)/t. Selective recomputation drops
    the 5as^2 b of the attention core (as flash attention never stores it); full
    recomputation keeps only each layer's input, 2sbh (/t with SP). Context parallelism
    splits s over cp ranks.

    MoE (moe_topk > 0; our estimate, no published term-by-term count): the MLP interior is
    each token's top-k experts' SwiGLU interiors, k x 6 s b ffn_e (/ expert TP), plus the
    dispatcher's permuted copies of the tokens going in and coming out, 2 x 2 k sbh, and the
    router's float32 logits and probabilities, 8 s b E (/t with SP, as the tokens are).
    """
    ffn = 4 * h if ffn is None else ffn
    kv = a if kv_heads is None else kv_heads
    s = s / cp
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (tp if sequence_parallel else 1)
    mask = 1 if dropout else 0
    # Inside the TP region (divided by t): Q and K (QK^T), V, the output projection's input,
    # the MLP's interior; then the score matrices unless recomputed or never stored.
    inner = 2 * sbh + 2 * sbh * kv / a + 2 * sbh * kv / a + 2 * sbh
    moe = 0.0
    if moe_topk:
        e_tp = tp if etp is None else etp
        moe = moe_topk * 6 * s * b * moe_ffn / e_tp
        moe += (4 * moe_topk * sbh + 8 * s * b * num_experts) / (tp if sequence_parallel else 1)
    else:
        inner += (4 + 2) * s * b * ffn if swiglu else (2 + 2) * s * b * ffn
    scores = 0.0
    if recompute == "none" and not flash_attention:
        scores = (2 + mask + (2 if dropout else 0)) * a * s * s * cp * b  # softmax, mask, out
    # Outside it (replicated without SP): two norm inputs, QKV and fc1 inputs, two masks.
    outer = 4 * sbh + 2 * sbh + 2 * sbh + 2 * mask * sbh
    if sequence_parallel:
        return (inner + scores + outer) / tp + moe
    return (inner + scores) / tp + outer + moe


def router_replay_bytes(tokens: float, layers: int, topk: int) -> float:
    """model.router_replay=rollout: the engine's expert choices of one micro-batch's tokens
    for the stage's layers, int64 [T, b, L, k] (megatron_agpo.models.moe), on the GPU."""
    return tokens * layers * topk * 8


def pipeline_in_flight(pp: int, vp: int, micro_batches: int) -> float:
    """Micro-batches whose activations the first stage holds at once under 1F1B, in units of
    one micro-batch through all of the stage's layers: pp (the warm-up), times the
    interleaving factor 1 + (pp - 1)/(pp vp) (Korthikanti et al., section 4.2.3); fewer when
    there are fewer micro-batches than stages."""
    if pp == 1:
        return 1.0
    if micro_batches < pp:
        return float(micro_batches)
    return pp * (1 + (pp - 1) / (pp * vp)) if vp > 1 else float(pp)


def logits_bytes(tokens: int, padded_vocab: int, tp: int, out_bytes: int, fused: bool) -> float:
    """The loss path of one micro-batch on the last stage. Fused (megatron_agpo.ops): the
    output layer's vocab-parallel logits [tokens, V/t] and one float32 buffer of the same shape
    (written over the logits when they are float32 already). Gathered: the logits shard plus
    the full vocabulary in float32 and its log-softmax, [tokens, V] twice."""
    shard = tokens * padded_vocab / tp
    if fused:
        return shard * (out_bytes + (0 if out_bytes == 4 else 4))
    return shard * out_bytes + 2 * 4 * tokens * padded_vocab


# ----------------------------------------------------------------------------- rollout
def kv_bytes_per_token(arch: ModelConfig, engine_tp: int, kv_dtype_bytes: int) -> float:
    """The engine's KV cache per token on one GPU: K and V of every layer, its share of the
    KV heads (replicated when there are fewer KV heads than engine ranks)."""
    heads = max(1, arch.num_query_groups // engine_tp)
    return 2 * arch.num_layers * heads * arch.head_dim * kv_dtype_bytes
