"""The per-token policy loss and its aggregation, as pure functions on plain tensors.

Shape legend: B sequences, T response tokens (padded), so per-token tensors are ``[B, T]``
(or any shape, for the elementwise part) and per-sequence tensors ``[B]``.

    rho = exp(logp - old_logp)
    L_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)     (PPO, clip-higher)
    L_t = min(L_t, -c * A)                       for A < 0             (dual clip)
    L_t = L_t * w_t                                                    (behaviour IS, optional)
        + kl_coef * KL(logp, ref_logp) - entropy_coef * H_t

    w_t = min(exp(old_logp - rollout_logp), C)                       (tis_mode="truncate")
    w_t = exp(old_logp - rollout_logp) if low <= it <= C, else 0      (tis_mode="mask")

This is AReaL's decoupled PPO: old_logp is the proximal policy (the trainer's recomputed
log-probs), rollout_logp the behaviour policy (the engine's log-probs of the tokens it
sampled, from whichever weight version sampled each token: with overlapped generation a
response may span several versions). The clip acts on the proximal ratio, the importance
weight proximal / behaviour corrects for the sampler being older (`importance_weight`).

With ``ratio_level="sequence"`` (GSPO) rho is the sequence's ratio
``s_i = exp(mean_t(logp - old_logp))`` for every token of sequence i, written as GSPO-token
does: ``exp(logp - sg(logp) + sg(log s_i))``, whose value is s_i and whose gradient in logp_t
is ``s_i``; under `seq-mean-token-mean` this is GSPO's objective and gradient exactly. As in
verl, that log-ratio is clamped at ``GSPO_LOG_RATIO_MAX`` = 10: a row above it has ratio e^10
and no gradient.

The same `token_loss` is used by the fused vocab-parallel loss (megatron_agpo.ops, autograd
Functions in plain PyTorch), so the fused and unfused paths cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

# Plain str (checked by `problems`), not Literal: the config is a Hydra structured
# config, and OmegaConf does not accept Literal annotations.
AggMode = str  # one of AGG_MODES
KLEstimator = str  # "k1" | "k3"
RatioLevel = str  # "token" | "sequence"

GSPO_LOG_RATIO_MAX = 10.0
"""GSPO's sequence log-ratio is clamped at this value, with zero gradient above it (verl's
`compute_policy_loss_gspo`)."""

TIS_MODES = ("truncate", "mask")
"""How the behaviour importance weight is bounded (`importance_weight`)."""

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-sum-constant",
)
"""The aggregation modes; see `aggregation_weights` for each one's formula."""


@dataclass
class PolicyLossConfig:
    """The surrogate objective. Defaults follow AGPO's reading (clip-higher, no KL)."""

    eps_low: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - eps_low."""
    eps_high: float = 0.28
    """Upper clip range: the ratio is clipped at 1 + eps_high (asymmetric, DAPO's clip-higher)."""
    dual_clip_c: float | None = 3.0
    """Dual clip for negative advantages: the loss of a token is at most c * |A|. None: off."""
    kl_coef: float = 0.0
    """Coefficient of the KL penalty to the reference policy (0: no reference model needed)."""
    kl_estimator: KLEstimator = "k3"
    """k1 = logp - ref_logp; k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0)."""
    kl_clamp: float | None = None
    """Clamp the k3 estimate to [-kl_clamp, kl_clamp] (verl clamps k3 to [-10, 10]: set 10);
    a clamped token's KL term has no gradient. k1 is never clamped (verl neither). None: no
    clamp."""
    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus (the loss gets -entropy_coef * H_t)."""
    tis_cap: float | None = 2.0
    """Truncated importance weight cap C for min(exp(old_logp - rollout_logp), C); used only
    when rollout log-probs are given. None: no correction."""
    tis_mode: str = "truncate"
    """How the behaviour importance weight w = exp(old_logp - rollout_logp) (proximal /
    behaviour, AReaL's decoupled PPO) is bounded at tis_cap: truncate (min(w, C), TIS; the
    default, today's loss) or mask (w where tis_low <= w <= C, else 0: the token leaves the
    loss, AReaL's behav_imp_weight_cap, icepop/MIS with tis_low)."""
    tis_low: float | None = None
    """tis_mode=mask: also mask tokens whose weight is below this (two-sided, icepop's
    [1/C, C]). None: no lower bound. Ignored by truncate."""
    agg_mode: AggMode = "token-mean"
    """token-mean (DAPO), token-sum, seq-mean-token-mean (original GRPO), seq-mean-token-sum,
    seq-sum-constant (Dr. GRPO). Every sequence-level mode counts every row in its divisor,
    a fully masked row included (verl's rule): see `aggregation_weights`."""
    norm_constant: float | None = None
    """The constant of seq-sum-constant (tokens per sequence). None: the trainer uses the
    maximum response length (`resolve_norm_constant`), as Dr. GRPO's MAX_TOKENS."""
    ratio_level: RatioLevel = "token"
    """token: the per-token ratio (PPO, GRPO, DAPO). sequence: GSPO's length-normalised
    sequence ratio s_i = exp(mean_t(logp - old_logp)), clipped per sequence; needs the
    per-row mean log-ratio (`sequence_log_ratio`) passed to `token_loss` as seq_log_ratio."""
    fuse_output_layer: bool = False
    """Trainer: fuse the output layer into the loss (`fused_output_layer_agpo_loss`): logits are
    computed chunk by chunk, never as a whole [tokens, V/TP] tensor (one extra matmul in the
    backward). Saves the logits' memory at large vocabularies; the math is unchanged."""
    producer: str = "torch"
    """Trainer: what computes the per-token statistics from the logits. torch: the chunked
    PyTorch path (every device; the reference). triton: the one-pass Triton kernel
    (`ops/triton_agpo.py`; CUDA, or Triton's interpreter with TRITON_INTERPRET=1); not with
    fuse_output_layer."""

    def problems(self, prefix: str = "algorithm.loss.") -> list[str]:
        """This section's problems, one line each naming the full key (none are checked at
        construction: the loss functions take the config as given)."""
        out = []
        checks = {
            "eps_low": (0 <= self.eps_low < 1, "must be in [0, 1)"),
            "eps_high": (self.eps_high >= 0, "must be >= 0"),
            "dual_clip_c": (self.dual_clip_c is None or self.dual_clip_c > 1, "must be > 1"),
            "kl_estimator": (self.kl_estimator in ("k1", "k3"), "must be 'k1' or 'k3'"),
            "tis_cap": (self.tis_cap is None or self.tis_cap > 0, "must be > 0"),
            "tis_mode": (self.tis_mode in TIS_MODES, f"must be one of {list(TIS_MODES)}"),
            "agg_mode": (self.agg_mode in AGG_MODES, f"must be one of {list(AGG_MODES)}"),
            "norm_constant": (
                self.norm_constant is None or self.norm_constant > 0,
                "must be > 0",
            ),
            "kl_clamp": (self.kl_clamp is None or self.kl_clamp > 0, "must be > 0"),
            "producer": (self.producer in ("torch", "triton"), "must be 'torch' or 'triton'"),
            "ratio_level": (
                self.ratio_level in ("token", "sequence"),
                "must be 'token' or 'sequence'",
            ),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                out.append(f"{prefix}{name}={getattr(self, name)!r}: {rule}")
        if self.tis_low is not None:
            if self.tis_low < 0:
                out.append(f"{prefix}tis_low={self.tis_low} must be >= 0")
            elif self.tis_cap is not None and self.tis_low >= self.tis_cap:
                out.append(f"{prefix}tis_low={self.tis_low} must be below tis_cap={self.tis_cap}")
        if self.producer == "triton" and self.fuse_output_layer:
            out.append(
                f"{prefix}producer='triton' computes from logits: it cannot be combined "
                f"with {prefix}fuse_output_layer=true (use producer=torch there)"
            )
        return out

    @property
    def needs_entropy_grad(self) -> bool:
        return self.entropy_coef != 0.0


class TokenLoss(NamedTuple):
    """Elementwise results, all of the input's shape."""

    loss: torch.Tensor
    """L_t, differentiable in logp (and entropy, when given)."""
    ratio: torch.Tensor
    """rho, detached."""
    clipped: torch.Tensor
    """bool: the clipped branch of the PPO min is the active one."""
    dual_clipped: torch.Tensor
    """bool: the dual clip bound is the active one."""
    kl: torch.Tensor | None
    """Per-token KL estimate (detached), when a reference is given."""
    tis_weight: torch.Tensor | None
    """Behaviour importance weight (detached, truncated or masked), when rollout log-probs
    are given."""
    tis_bounded: torch.Tensor | None = None
    """bool: the weight was truncated (above tis_cap) or masked (outside [tis_low, tis_cap])."""


def check_same_shape(**tensors: torch.Tensor | None) -> None:
    """Raise naming every tensor and its shape when the given tensors' shapes differ."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
        raise ValueError(f"shape mismatch: {listed}")


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    entropy: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    seq_log_ratio: torch.Tensor | None = None,
) -> TokenLoss:
    """Per-token loss L_t. All inputs share one shape (advantages already broadcast per token).

    old_logp None means on-policy (the ratio is 1 with the gradient of logp).
    seq_log_ratio: with cfg.ratio_level="sequence" (GSPO), each token's sequence's mean
    log-ratio mean_t(logp - old_logp) (`sequence_log_ratio`); it is treated as a constant.
    """
    check_same_shape(
        logp=logp,
        old_logp=old_logp,
        advantages=advantages,
        entropy=entropy,
        ref_logp=ref_logp,
        rollout_logp=rollout_logp,
        seq_log_ratio=seq_log_ratio,
    )
    if old_logp is None:
        old_logp = logp.detach()
    adv = advantages.to(logp.dtype)
    if cfg.ratio_level == "sequence":
        if seq_log_ratio is None:
            raise ValueError(
                "PolicyLossConfig.ratio_level='sequence' (GSPO) needs seq_log_ratio, the "
                "per-sequence mean log-ratio (algorithms.sequence_log_ratio); this caller "
                "passes per-token inputs only"
            )
        # GSPO-token: value s_i, gradient s_i * d logp_t (the per-token weight 1/|y_i| comes
        # from the seq-mean-token-mean aggregation). Clamped at 10 as verl does, the whole
        # expression, so a row above it has no gradient: a stale row with a negative advantage
        # would otherwise push with e^(log s_i) |A| (the GSPO preset has no dual clip).
        log_ratio = (logp - logp.detach() + seq_log_ratio.detach().to(logp.dtype)).clamp(
            max=GSPO_LOG_RATIO_MAX
        )
    else:
        # Clamp the log-ratio before exp: a stale token can otherwise overflow to inf*0 = NaN.
        log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_obj = -adv * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = torch.maximum(unclipped, clipped_obj)
    clipped = clipped_obj > unclipped
    dual_clipped = torch.zeros_like(clipped)
    if cfg.dual_clip_c is not None:
        bound = -adv * cfg.dual_clip_c  # positive where adv < 0
        dual_clipped = (adv < 0) & (loss > bound)
        loss = torch.where(dual_clipped, bound, loss)

    tis_weight = tis_bounded = None
    if rollout_logp is not None and cfg.tis_cap is not None:
        tis_weight, tis_bounded = importance_weight(old_logp.detach(), rollout_logp, cfg)
        loss = loss * tis_weight

    kl = None
    if ref_logp is not None and cfg.kl_coef != 0.0:
        kl = kl_estimate(logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp)
        loss = loss + cfg.kl_coef * kl
        kl = kl.detach()
    if entropy is not None and cfg.entropy_coef != 0.0:
        loss = loss - cfg.entropy_coef * entropy
    return TokenLoss(loss, ratio.detach(), clipped, dual_clipped, kl, tis_weight, tis_bounded)


def importance_weight(
    proximal_logp: torch.Tensor, behaviour_logp: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The behaviour importance weight per token and where it was bounded (bool).

    proximal_logp: the trainer's recomputed old log-probs; behaviour_logp: the engine's
    log-probs of the sampled tokens (each from the weight version that sampled it). Needs
    cfg.tis_cap. truncate: min(w, C); mask: w inside [tis_low, C], else 0."""
    raw = torch.exp(proximal_logp - behaviour_logp)
    cap = cfg.tis_cap
    if cfg.tis_mode == "mask":
        keep = raw <= cap
        if cfg.tis_low is not None:
            keep = keep & (raw >= cfg.tis_low)
        return torch.where(keep, raw, torch.zeros_like(raw)), ~keep
    return raw.clamp(max=cap), raw > cap


def importance_weight_stats(
    proximal_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
) -> dict[str, float]:
    """Per-step statistics of the behaviour weight over the tokens where mask is set (host
    floats; a logging step's read): the raw weight's mean and max, the applied weight's
    mean, and the share of tokens truncated (tis_mode=truncate) or masked (mask)."""
    m = mask.bool()
    raw = torch.exp((proximal_logp - behaviour_logp).double())[m]
    if not raw.numel():
        return {}
    names, values = ["is/raw_mean", "is/raw_max"], [raw.mean(), raw.max()]
    if cfg.tis_cap is not None:
        w, bounded = importance_weight(proximal_logp.double(), behaviour_logp.double(), cfg)
        names += ["is/weight_mean", "is/weight_max",
                  f"is/{'masked' if cfg.tis_mode == 'mask' else 'truncated'}"]  # fmt: skip
        values += [w[m].mean(), w[m].max(), bounded[m].double().mean()]
    # One host copy for all of them.
    return dict(zip(names, torch.stack(values).tolist(), strict=True))


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: KLEstimator,
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled-token log-probs (Schulman's k1 / k3).
    `clamp` bounds k3 to [-clamp, clamp] as verl's low_var_kl does ([-10, 10]); k1 is returned
    unclamped whatever `clamp` is, as verl's "kl" estimator."""
    if estimator == "k1":
        return logp - ref_logp
    log_r = (ref_logp - logp).clamp(-20.0, 20.0)
    kl = torch.exp(log_r) - log_r - 1.0
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def sequence_log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's per-sequence log-ratio, broadcast to tokens and detached: for every token of row
    i, log s_i = sum_t m_it (logp_it - old_logp_it) / sum_t m_it (0 for a fully masked row).

    logp, old_logp, mask: [B, T]. Padded positions may hold garbage (they are masked out).
    """
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    m = mask.to(logp.dtype)
    diff = torch.where(m != 0, (logp - old_logp).detach(), torch.zeros_like(logp))
    per_row = (diff * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
    return per_row.expand_as(logp)


def sequence_log_ratio_flat(
    logp: torch.Tensor, old_logp: torch.Tensor, row: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """`sequence_log_ratio` for flat token vectors [N] (the fused ops' layout): row[i] is
    the sequence of token i, valid[i] whether it is a response token. Returns [N], detached;
    a fully invalid row gives 0. The rows' tokens must all be in this call."""
    check_same_shape(logp=logp, old_logp=old_logp, row=row, valid=valid)
    rows = int(row.max()) + 1 if row.numel() else 0
    v = valid.to(logp.dtype)
    diff = torch.where(valid.bool(), (logp - old_logp).detach(), torch.zeros_like(logp))
    num = torch.zeros(rows, dtype=logp.dtype, device=logp.device).index_add_(0, row, diff * v)
    den = torch.zeros(rows, dtype=logp.dtype, device=logp.device).index_add_(0, row, v)
    return (num / den.clamp(min=1.0))[row]


def resolve_norm_constant(cfg: PolicyLossConfig, max_new_tokens: int) -> float:
    """The constant C of seq-sum-constant: cfg.norm_constant if set, else the maximum response
    length (Dr. GRPO's MAX_TOKENS). Fixed for a run, unlike a batch's padded length, so the
    loss scale of a response does not change with the other responses of its batch."""
    if cfg.norm_constant is not None:
        return float(cfg.norm_constant)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens!r} must be a positive int (rollout.max_new_tokens)"
        )
    return float(max_new_tokens)


def aggregation_weights(
    mask: torch.Tensor, mode: AggMode, norm_constant: float | None = None
) -> torch.Tensor:
    """Weights w_BT with loss = sum(w * L_t): every aggregation mode as one linear map.

    mask: [B, T], 1 for response tokens; n_i = sum_t m_it; N = sum_i n_i.

    - token-mean:          sum(m L) / N
    - token-sum:           sum(m L)
    - seq-mean-token-mean: (1/B) sum_i sum_t m_it L_it / n_i
    - seq-mean-token-sum:  (1/B) sum_i sum_t m_it L_it
    - seq-sum-constant:    (1/B) sum_i sum_t m_it L_it / C, C = norm_constant

    Fully masked rows (the overlong filter masks whole responses): one rule for every
    sequence-level mode, verl's: the row counts in the divisor B and adds 0 to the sum. So a
    filtered response dilutes the step like a response whose loss is 0, in every mode alike.

    norm_constant: pass `resolve_norm_constant(cfg, max_new_tokens)`; None falls back to T,
    the batch's padded length, which changes from batch to batch.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    rows = max(mask.shape[0], 1)
    if mode == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if mode == "token-sum":
        return m.clone()
    if mode == "seq-mean-token-mean":
        return m / m.sum(dim=1, keepdim=True).clamp(min=1.0) / rows
    if mode == "seq-mean-token-sum":
        return m / rows
    if mode == "seq-sum-constant":
        const = float(norm_constant) if norm_constant is not None else float(mask.shape[1])
        if const <= 0:
            raise ValueError(f"norm_constant={norm_constant} must be > 0")
        return m / (rows * const)
    raise ValueError(f"unknown aggregation mode {mode!r}: one of {list(AGG_MODES)}")


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, mode: AggMode, norm_constant: float | None = None
) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar with one of the aggregation modes."""
    check_same_shape(values=values, mask=mask)
    w = aggregation_weights(mask, mode, norm_constant).to(values.dtype)
    # where(): padded positions may hold inf/NaN garbage; 0 * NaN would poison the sum.
    return torch.where(w != 0, values * w, torch.zeros_like(values)).sum()


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    n = m.sum()
    return float((x.double() * m).sum() / n) if n > 0 else float("nan")


def polarity_metrics(
    tl: TokenLoss,
    advantages_BT: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
) -> dict[str, float]:
    """Loss, clip fraction, entropy (and counts) split by the sign of the advantage.

    How a user sees AGPO at work: negatives pushed at full strength, positives scaled by w_pos.
    """
    m = mask.to(torch.float64)
    out: dict[str, float] = {}
    for name, sel in (("pos", advantages_BT > 0), ("neg", advantages_BT < 0), ("all", None)):
        mm = m if sel is None else m * sel.to(torch.float64)
        out[f"{name}/tokens"] = float(mm.sum())
        out[f"{name}/loss"] = _masked_mean(tl.loss.detach(), mm)
        out[f"{name}/clip_frac"] = _masked_mean(tl.clipped.to(torch.float64), mm)
        out[f"{name}/dual_clip_frac"] = _masked_mean(tl.dual_clipped.to(torch.float64), mm)
        out[f"{name}/ratio"] = _masked_mean(tl.ratio, mm)
        if entropy is not None:
            out[f"{name}/entropy"] = _masked_mean(entropy.detach(), mm)
    if tl.kl is not None:
        out["all/kl"] = _masked_mean(tl.kl, m)
    if tl.tis_weight is not None:
        out["all/tis_weight"] = _masked_mean(tl.tis_weight, m)
        out["all/tis_bounded"] = _masked_mean(tl.tis_bounded.to(torch.float64), m)
    return out


def expand_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence advantages [B] to per-token [B, T] (or pass [B, T] through, checked)."""
    if advantages.dim() == 1:
        if advantages.shape[0] != mask.shape[0]:
            raise ValueError(
                f"advantages{list(advantages.shape)} has one value per sequence but mask"
                f"{list(mask.shape)} has {mask.shape[0]} sequences"
            )
        return advantages[:, None].expand(mask.shape)
    check_same_shape(advantages=advantages, mask=mask)
    return advantages


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    entropy: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    norm_constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss and metrics from per-token log-probs [B, T] (unfused reference path).

    advantages: [B] (one per response) or [B, T]. norm_constant: seq-sum-constant's C
    (default: cfg.norm_constant, else T; the trainer passes `resolve_norm_constant`).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    check_same_shape(logp=logp, mask=mask)
    adv_BT = expand_advantages(advantages, mask)
    seq_lr = None
    if cfg.ratio_level == "sequence":
        old = logp.detach() if old_logp is None else old_logp
        seq_lr = sequence_log_ratio(logp, old, mask)
    tl = token_loss(
        logp,
        old_logp,
        adv_BT,
        cfg,
        entropy=entropy,
        ref_logp=ref_logp,
        rollout_logp=rollout_logp,
        seq_log_ratio=seq_lr,
    )
    if norm_constant is None:
        norm_constant = cfg.norm_constant
    loss = aggregate(tl.loss, mask, cfg.agg_mode, norm_constant)
    return loss, polarity_metrics(tl, adv_BT, mask, entropy)
