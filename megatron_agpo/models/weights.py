"""HF <-> megatron-core weight layout for Llama / Qwen2 / Qwen3 decoders.

Shape legend: H hidden, F ffn, D head_dim, Q query heads, G query groups (KV heads),
V vocab, Vp padded vocab, t = TP size. Megatron's names are those of GPTModel with the local
layer spec; the TE spec's fused-norm names map to the same HF tensors (see `_TE_ALIASES`).

Megatron layouts, per TP rank r (each rank owns G/t query groups and F/t ffn columns):
- linear_qkv.weight [(Q/G + 2) * D * G/t, H]: for each local group g,
  [q heads of g (Q/G * D rows), k_g (D rows), v_g (D rows)]; bias likewise.
- linear_fc1.weight [2F/t, H]: [gate rows of rank r; up rows of rank r].
- linear_proj / linear_fc2: column slices (dim 1); embedding / output_layer: row slices of the
  padded vocabulary (dim 0). Norms are replicated, the q/k head norms (Qwen3,
  self_attention.{q,k}_layernorm.weight [D], one weight for all heads) included.
Concatenating all ranks' qkv shards gives the same grouped layout over all G groups, so the
q/k/v split does not depend on t; fc1 must be split per shard (gate/up are per rank).

Mixture of experts (Qwen3-MoE; E experts, F_e expert width, e = EP size): each EP rank r
holds experts r*E/e .. (r+1)*E/e - 1, whole (expert TP is 1), replicated over TP.
- mlp.router.weight [E, H] = HF mlp.gate.weight (replicated);
- mlp.experts.local_experts.j.linear_fc1.weight [2F_e, H] = [gate_proj; up_proj] of HF expert
  r*E/e + j, linear_fc2.weight [H, F_e] = its down_proj (TE's grouped experts:
  mlp.experts.linear_fc1.weight<j>, linear_fc2.weight<j>, the same layouts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_agpo.models.config import ModelConfig


class WeightMismatchError(ValueError):
    """A tensor's shape does not match what the model expects."""


# ----------------------------------------------------------------------------- layouts
def pad_vocab(w_VH: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Append zero rows up to the padded vocabulary."""
    pad = cfg.padded_vocab_size - w_VH.shape[0]
    if pad < 0:
        raise WeightMismatchError(
            f"vocabulary tensor has {w_VH.shape[0]} rows > padded size {cfg.padded_vocab_size}"
        )
    if pad == 0:
        return w_VH
    return torch.cat([w_VH, w_VH.new_zeros(pad, *w_VH.shape[1:])], dim=0)


def unpad_vocab(w_VpH: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return w_VpH[: cfg.vocab_size]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q [Q*D, ...], k/v [G*D, ...] -> megatron grouped [G*(Q/G+2)*D, ...] (weight or bias).
    Works on any whole number of groups (a TP shard: G/t groups)."""
    D, hpg = cfg.head_dim, cfg.heads_per_group
    G = k.shape[0] // D
    rest = q.shape[1:]
    q_g = q.reshape(G, hpg * D, *rest)
    k_g = k.reshape(G, D, *rest)
    v_g = v.reshape(G, D, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(G * (hpg + 2) * D, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of fuse_qkv for any whole number of groups (a TP shard or the full tensor)."""
    D, hpg = cfg.head_dim, cfg.heads_per_group
    rest = qkv.shape[1:]
    g = qkv.shape[0] // ((hpg + 2) * D)
    x = qkv.reshape(g, (hpg + 2) * D, *rest)
    q, k, v = torch.split(x, [hpg * D, D, D], dim=1)
    return (q.reshape(g * hpg * D, *rest), k.reshape(g * D, *rest), v.reshape(g * D, *rest))


def shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return torch.chunk(t, size, dim=dim)[rank] if size > 1 else t


# ----------------------------------------------------------------------------- name table
@dataclass(frozen=True)
class _Rule:
    """How one megatron parameter maps to HF tensors.

    to_hf(local) -> list of HF-layout pieces of this TP shard (same order as hf_names);
    tp_dim: dim along which the HF pieces are split across TP ranks (None: replicated);
    from_hf(full_hf_tensors, rank, size) -> local megatron tensor.
    """

    hf_names: tuple[str, ...]
    tp_dim: int | None
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]
    from_hf: Callable[[list[torch.Tensor], int, int], torch.Tensor]
    vocab: bool = False
    expert: int | None = None
    """For an expert's weight, its local index on this EP rank (gathered over EP on export)."""


def _replicated(hf_name: str) -> _Rule:
    return _Rule((hf_name,), None, lambda t: [t], lambda ts, r, s: ts[0])


def _sliced(hf_name: str, dim: int) -> _Rule:
    return _Rule((hf_name,), dim, lambda t: [t], lambda ts, r, s: shard(ts[0], dim, r, s))


def _rules_for_layer(i: int, cfg: ModelConfig) -> dict[str, _Rule]:
    hf = f"model.layers.{i}."

    def qkv_rule(kind: str) -> _Rule:
        names = tuple(f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv")

        def from_hf(ts, r, s):
            q, k, v = (shard(t, 0, r, s) for t in ts)  # group-aligned: G % s == 0
            return fuse_qkv(q, k, v, cfg)

        return _Rule(names, 0, lambda t: list(split_qkv(t, cfg)), from_hf)

    def fc1_from_hf(ts, r, s):
        gate, up = (shard(t, 0, r, s) for t in ts)
        return torch.cat([gate, up], dim=0)

    rules = {
        "input_layernorm.weight": _replicated(f"{hf}input_layernorm.weight"),
        "mlp.router.weight": _replicated(f"{hf}mlp.gate.weight"),
        "self_attention.linear_qkv.weight": qkv_rule("weight"),
        "self_attention.linear_proj.weight": _sliced(f"{hf}self_attn.o_proj.weight", 1),
        "pre_mlp_layernorm.weight": _replicated(f"{hf}post_attention_layernorm.weight"),
        "mlp.linear_fc1.weight": _Rule(
            (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"),
            0,
            lambda t: list(torch.chunk(t, 2, dim=0)),
            fc1_from_hf,
        ),
        "mlp.linear_fc2.weight": _sliced(f"{hf}mlp.down_proj.weight", 1),
    }
    if cfg.is_moe:  # every layer's MLP is the experts (matched in rule_for) and the router
        del rules["mlp.linear_fc1.weight"], rules["mlp.linear_fc2.weight"]
    else:
        del rules["mlp.router.weight"]
    if cfg.qkv_bias:
        rules["self_attention.linear_qkv.bias"] = qkv_rule("bias")
    if cfg.qk_layernorm:
        rules["self_attention.q_layernorm.weight"] = _replicated(f"{hf}self_attn.q_norm.weight")
        rules["self_attention.k_layernorm.weight"] = _replicated(f"{hf}self_attn.k_norm.weight")
    return rules


# Transformer Engine's spec fuses the pre-attention / pre-MLP norms into the next linear.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# An expert's weights: SequentialMLP's (local spec) and TEGroupedMLP's (TE spec) names.
_EXPERT_RE = re.compile(
    r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$"
)


def _expert_rule(hf_layer: str, fc: str, local: int, global_: int) -> _Rule:
    hf = f"{hf_layer}mlp.experts.{global_}."
    if fc == "linear_fc2":
        return _Rule((f"{hf}down_proj.weight",), None, lambda t: [t], lambda ts, r, s: ts[0],
                     expert=local)  # fmt: skip
    return _Rule(
        (f"{hf}gate_proj.weight", f"{hf}up_proj.weight"),
        None,
        lambda t: list(torch.chunk(t, 2, dim=0)),
        lambda ts, r, s: torch.cat(ts, dim=0),
        expert=local,
    )


def rule_for(
    name: str, cfg: ModelConfig, layer_offset: int = 0, expert_offset: int = 0
) -> _Rule | None:
    """The rule for a megatron parameter name (local layer index + layer_offset = global;
    local expert index + expert_offset = global, for an MoE model's experts). None for
    non-weight entries (TE `_extra_state`)."""
    m = _LAYER_RE.match(name)
    if m:
        suffix = _TE_ALIASES.get(m.group(2), m.group(2))
        if suffix.endswith("_extra_state"):
            return None
        layer = int(m.group(1)) + layer_offset
        e = _EXPERT_RE.match(suffix) if cfg.is_moe else None
        if e:
            local = int(e.group(1) if e.group(1) is not None else e.group(4))
            fc = e.group(2) or e.group(3)
            return _expert_rule(f"model.layers.{layer}.", fc, local, local + expert_offset)
        rules = _rules_for_layer(layer, cfg)
        if suffix not in rules:
            raise KeyError(f"no HF mapping for megatron parameter {name!r}")
        return rules[suffix]
    if name == "embedding.word_embeddings.weight":
        return _vocab_rule("model.embed_tokens.weight", cfg)
    if name == "output_layer.weight":
        # Tied models keep a copy on the last PP stage; HF has only embed_tokens.
        hf_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return _vocab_rule(hf_name, cfg)
    if name == "decoder.final_layernorm.weight":
        return _replicated("model.norm.weight")
    if name.endswith("_extra_state"):
        return None
    raise KeyError(f"no HF mapping for megatron parameter {name!r}")


def _vocab_rule(hf_name: str, cfg: ModelConfig) -> _Rule:
    return _Rule(
        (hf_name,),
        0,
        lambda t: [t],
        lambda ts, r, s: shard(pad_vocab(ts[0], cfg), 0, r, s),
        vocab=True,
    )


# ----------------------------------------------------------------------------- HF side
class HFWeights:
    """Lazy, tensor-by-tensor reader of an HF checkpoint folder (safetensors, or
    pytorch_model*.bin through torch.load(weights_only=True))."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        st = sorted(self.path.glob("*.safetensors"))
        if st:
            from safetensors import safe_open

            for f in st:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                        self._where[k] = f
        else:
            bins = sorted(self.path.glob("pytorch_model*.bin"))
            if not bins:
                raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {self.path}")
            for f in bins:
                sd = torch.load(f, map_location="cpu", weights_only=True)
                self._bins[f] = sd
                self._where.update(dict.fromkeys(sd, f))

    def keys(self) -> list[str]:
        return list(self._where)

    def __iter__(self):
        return iter(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"HF checkpoint {self.path} has no tensor {name!r}")
        f = self._where[name]
        if f in self._bins:
            return self._bins[f][name]
        from safetensors import safe_open

        with safe_open(f, framework="pt") as h:
            return h.get_tensor(name)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._where.values()))


# ----------------------------------------------------------------------------- HF -> megatron
def hf_to_megatron_tensors(
    get_hf: Callable[[str], torch.Tensor],
    names_and_shapes: Iterable[tuple[str, torch.Size]],
    cfg: ModelConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
    layer_offset: int = 0,
    expert_offset: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """For each megatron (local) parameter, its tensor for TP rank tp_rank, built from HF
    tensors fetched one at a time by get_hf(hf_name). Checks shapes. expert_offset: the
    global index of this EP rank's first expert (MoE)."""
    for name, shape in names_and_shapes:
        rule = rule_for(name, cfg, layer_offset, expert_offset)
        if rule is None:
            continue
        t = rule.from_hf([get_hf(n) for n in rule.hf_names], tp_rank, tp_size)
        if tuple(t.shape) != tuple(shape):
            hf_shapes = ", ".join(f"{n} {tuple(get_hf(n).shape)}" for n in rule.hf_names)
            raise WeightMismatchError(
                f"megatron parameter {name!r} expects shape {tuple(shape)} on TP rank "
                f"{tp_rank}/{tp_size}, HF gives {tuple(t.shape)} (from {hf_shapes})"
            )
        yield name, t


def _unwrap(model):
    chunks = model if isinstance(model, list | tuple) else [model]
    out = []
    for m in chunks:
        while hasattr(m, "module") and not hasattr(m, "decoder"):
            m = m.module
        out.append(m)
    return out


def _layer_offset(model) -> int:
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if not parallel_state.model_parallel_is_initialized():
        return 0
    return get_transformer_layer_offset(model.config)


@dataclass(frozen=True)
class GatherGroups:
    """Process groups with the members of this rank's TP, EP and pipeline groups, for a gather
    of the weights that runs in a thread beside the training step (the background weight
    sync): the step's own collectives keep megatron's groups. None: that kind has one member.
    Built collectively by `mirror` (every rank)."""

    tp: Any = None
    ep: Any = None
    pp: Any = None

    @classmethod
    def mirror(cls, cfg: ModelConfig) -> GatherGroups:
        from megatron.core import parallel_state as ps

        from megatron_agpo.parallel import mirror_group

        ep = ps.get_expert_model_parallel_group() if cfg.is_moe else None
        return cls(
            tp=mirror_group(ps.get_tensor_model_parallel_group()),
            ep=None if ep is None else mirror_group(ep),
            pp=mirror_group(ps.get_pipeline_model_parallel_group()),
        )


def _ep(cfg: ModelConfig, groups: GatherGroups | None = None):
    """(EP rank, EP size, EP group, local experts per rank) of this process."""
    from megatron.core import parallel_state

    if not cfg.is_moe or not parallel_state.model_parallel_is_initialized():
        return 0, 1, None, cfg.num_experts
    size = parallel_state.get_expert_model_parallel_world_size()
    return (
        parallel_state.get_expert_model_parallel_rank(),
        size,
        parallel_state.get_expert_model_parallel_group() if groups is None else groups.ep,
        cfg.num_experts // size,
    )


def _tp(groups: GatherGroups | None = None):
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_group() if groups is None else groups.tp,
    )


@torch.no_grad()
def load_hf_weights(model, hf: HFWeights | str | Path, cfg: ModelConfig) -> None:
    """Copy an HF checkpoint into this rank's GPTModel shard (every rank reads only the HF
    tensors its shard needs, one at a time)."""
    hf = hf if isinstance(hf, HFWeights) else HFWeights(hf)
    tp_rank, tp_size, _ = _tp()
    ep_rank, _, _, local_experts = _ep(cfg)
    for m in _unwrap(model):
        params = dict(m.named_parameters())
        shapes = [(n, p.shape) for n, p in params.items()]
        loaded = hf_to_megatron_tensors(hf.get, shapes, cfg, tp_rank, tp_size, _layer_offset(m),
                                        ep_rank * local_experts)  # fmt: skip
        for name, t in loaded:
            params[name].copy_(t)


# ----------------------------------------------------------------------------- megatron -> HF
@torch.no_grad()
def megatron_to_hf_tensors(
    model_or_state,
    cfg: ModelConfig,
    layer_offset: int | None = None,
    gather: bool = True,
    dtype: torch.dtype | None = None,
    groups: GatherGroups | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (hf_name, tensor) for this rank's PP stage, one tensor at a time.

    model_or_state: a GPTModel (optionally wrapped in DDP / Float16Module, or a list of
    chunks) or a dict {megatron local name: tensor} such as `model.state_dict()`.
    With TP > 1 every rank of the TP group must call this (TP shards are all-gathered); all
    TP ranks receive every tensor. Likewise with EP > 1 (MoE): each expert weight is
    all-gathered over the EP group and every EP rank yields all experts' tensors.
    Layers carry global HF indices (local + PP offset); each
    PP stage yields only the layers it holds. A tied output layer on the last stage is skipped
    (HF has only embed_tokens). The padded vocabulary rows are stripped. Tensors are cast to
    `dtype` (default cfg.params_dtype): megatron keeps norm weights in fp32 in a bf16 model,
    and values loaded from bf16 come back bit-exact. `groups`: gather over these instead of
    megatron's TP / EP groups (a gather beside the training step's collectives).
    """
    dtype = dtype or cfg.torch_dtype
    tp_rank, tp_size, tp_group = _tp(groups) if gather else (0, 1, None)
    ep_rank, ep_size, ep_group, local_experts = _ep(cfg, groups)
    if not gather:  # this rank's own experts only, under their global names
        ep_size = 1
    if isinstance(model_or_state, dict):
        items = [(model_or_state, layer_offset or 0)]
    else:
        items = []
        for m in _unwrap(model_or_state):
            offset = _layer_offset(m) if layer_offset is None else layer_offset
            items.append((dict(m.named_parameters()), offset))
    for state, offset in items:
        for name, local in state.items():
            if cfg.tie_word_embeddings and name == "output_layer.weight":
                continue
            rule = rule_for(name, cfg, offset, ep_rank * local_experts)
            if rule is None:
                continue
            pieces = rule.to_hf(local.detach())
            if rule.expert is not None and ep_size > 1:
                # Every EP rank holds its own experts under the same local names: gather
                # expert j of each rank k (global k * local_experts + j).
                for j, piece in enumerate(pieces):
                    parts = [torch.empty_like(piece) for _ in range(ep_size)]
                    dist.all_gather(parts, piece.contiguous(), group=ep_group)
                    for k, part in enumerate(parts):
                        other = rule_for(name, cfg, offset, k * local_experts)
                        yield other.hf_names[j], part.to(dtype).contiguous()
                continue
            for hf_name, piece in zip(rule.hf_names, pieces, strict=True):
                full = piece
                if rule.tp_dim is not None and tp_size > 1:
                    parts = [torch.empty_like(piece) for _ in range(tp_size)]
                    dist.all_gather(parts, piece.contiguous(), group=tp_group)
                    full = torch.cat(parts, dim=rule.tp_dim)
                if rule.vocab:
                    full = unpad_vocab(full, cfg)
                yield hf_name, full.to(dtype).contiguous()


_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                torch.int32, torch.uint8, torch.bool)  # fmt: skip
_MAX_DIMS = 8


def _send_tensor(name: str | None, t: torch.Tensor | None, dst: int, device, group=None) -> None:
    """One named tensor as plain tensors: an int64 header [name bytes, ndim, dtype, shape...],
    the name's UTF-8 bytes, the data. No pickling; `name=None` ends the stream."""
    header = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64, device=device)
    if name is None:
        header[0] = -1
        dist.send(header, dst=dst, group=group)
        return
    raw = name.encode()
    header[0], header[1], header[2] = len(raw), t.dim(), _WIRE_DTYPES.index(t.dtype)
    header[3 : 3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(header, dst=dst, group=group)
    dist.send(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device), dst=dst, group=group)
    dist.send(t.contiguous(), dst=dst, group=group)


def _recv_tensor(src: int, device, group=None) -> tuple[str, torch.Tensor] | None:
    header = torch.empty(3 + _MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, src=src, group=group)
    n_name, ndim, code, *shape = header.tolist()
    if n_name < 0:
        return None
    raw = torch.empty(n_name, dtype=torch.uint8, device=device)
    dist.recv(raw, src=src, group=group)
    t = torch.empty(shape[:ndim], dtype=_WIRE_DTYPES[code], device=device)
    dist.recv(t, src=src, group=group)
    return raw.cpu().numpy().tobytes().decode(), t


def gather_hf_tensors_to_rank0(
    model, cfg: ModelConfig, groups: GatherGroups | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of a (TP x PP x DP) model, yielded on global rank 0, one at a time.

    Collective over data-parallel rank 0's model-parallel ranks only (the other DP replicas
    hold the same weights and return at once): each iterates it to the end. Rank 0 (stage 0)
    yields its own stage's tensors, then receives the other stages' from the ranks of its
    pipeline group, one tensor per message (a plain header, the name's bytes, the data; never
    pickled), so no rank holds more than one full tensor beyond its own shards. The other
    ranks yield nothing; they take part in their stage's TP all-gathers and send.
    `groups`: communicate over these (`GatherGroups.mirror`) instead of megatron's groups and
    the default group: a gather in a thread beside the training step.
    """
    from megatron.core import parallel_state as ps

    replica = dist.is_initialized() and ps.model_parallel_is_initialized()
    if replica and ps.get_data_parallel_rank() != 0 and _ep(cfg)[1] == 1:
        # A replica of DP rank 0's weights: nothing of it is consumed. (With expert
        # parallelism the experts are spread over DP ranks, so every rank takes part in the
        # EP all-gathers and rank 0 yields them all.)
        return
    own = megatron_to_hf_tensors(model, cfg, groups=groups)
    if ps.get_pipeline_model_parallel_world_size() == 1 or not dist.is_initialized():
        if not dist.is_initialized() or dist.get_rank() == 0:
            yield from own
        else:
            for _ in own:  # TP all-gathers
                pass
        return
    line = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    rank = dist.get_rank()
    device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    pp = None if groups is None else groups.pp
    if rank == 0:
        yield from own
        for src in line[1:]:
            while (item := _recv_tensor(src, device, pp)) is not None:
                yield item
    elif line[0] == 0:  # a later stage of rank 0's pipeline: send this stage to rank 0
        for name, t in own:
            _send_tensor(name, t, 0, device, pp)
        _send_tensor(None, None, 0, device, pp)
    else:
        for _ in own:
            pass


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
    )
