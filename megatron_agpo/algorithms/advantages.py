"""Per-response advantages for AGPO and the algorithms it contains as special cases.

Each polarity (negative: r <= tau, positive: r > tau) gets one rule:

- ``constant``: ``A = -w`` for negatives, ``A = +w`` for positives;
- ``group``:    ``A = w * (r - mu) / (sigma + eps)`` (``std="none"``: ``w * (r - mu)``);
- ``none``:     ``A = 0``.

mu and sigma are the mean and standard deviation of the rewards of the response's group
(the G responses to one prompt). With ``baseline="leave_one_out"`` (RLOO) mu is the mean of
the group's *other* responses. ``batch_norm`` (REINFORCE++ with baseline) then whitens the
advantages of the batch's groups that carry signal (`whiten`):
``(A - mean(A)) / (std(A) + eps)`` over those rows only.

A group whose rewards are all equal has no signal: the group rule gives it exactly 0 (not the
1e-17 a float group mean leaves), and whitening leaves a group whose advantages are all 0 at
exactly 0 and out of its statistics. So dynamic sampling's ``zero_advantage`` filter drops
exactly those groups, and the kept groups' whitened advantages do not depend on how many were
dropped. A group of one response has no baseline: the group rule gives it 0 (every std mode).
See ../../docs/ALGORITHM.md for the formulas and the presets' derivations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_agpo.registry import Registry

RULES = Registry("advantage rule", "algorithm.pos_rule / algorithm.neg_rule")
"""The per-polarity advantage rules. A rule is `rule(r_GN, group_score, weight, sign, cfg)` ->
[groups, G]: r_GN the rewards by group, `group_score()` the group-normalised score (computed
on first call), `sign` +1 for positives and -1 for negatives. A new estimator is one function
registered with `@register_rule("name")`, then `algorithm.pos_rule=name` (or a preset)."""
register_rule = RULES.register


def _group_score(r_GN: torch.Tensor, cfg: AdvantageConfig) -> torch.Tensor:
    """(r - baseline) / (std + eps) within each group (std="none": no division); exactly 0
    for a group of equal rewards or of one response (nothing to compare with)."""
    group_size = r_GN.shape[1]
    if group_size < 2:
        return torch.zeros_like(r_GN)
    mu = r_GN.mean(dim=1, keepdim=True)
    z = r_GN - mu
    if cfg.baseline == "leave_one_out":
        # r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mu)
        z = z * (group_size / (group_size - 1))
    if cfg.std != "none":
        sigma = r_GN.std(dim=1, keepdim=True, correction=1 if cfg.std == "bessel" else 0)
        z = z / (sigma + cfg.eps)
    # All-equal rewards: exactly 0. The float mean of equal values need not equal them
    # (3 x 0.1 sums to 0.30000000000000004), which left 1e-17 here, 1e-11 after the std.
    return z.masked_fill((r_GN == r_GN[:, :1]).all(dim=1, keepdim=True), 0.0)


GroupScore = Callable[[], torch.Tensor]


@register_rule("constant")
def constant_rule(r_GN, group_score: GroupScore, weight: float, sign: float, cfg):
    """A = sign * w for every response of the polarity."""
    return torch.full_like(r_GN, sign * weight)


@register_rule("group")
def group_rule(r_GN, group_score: GroupScore, weight: float, sign: float, cfg):
    """A = w * group score (GRPO's z-score, Dr. GRPO's r - mu, RLOO's leave-one-out)."""
    return weight * group_score()


@register_rule("none")
def no_rule(r_GN, group_score: GroupScore, weight: float, sign: float, cfg):
    """A = 0: the polarity gets no gradient (PSR / NSR)."""
    return torch.zeros_like(r_GN)


# Plain str (checked against RULES), not Literal: OmegaConf rejects Literal annotations.
Rule = str  # "constant" | "group" | "none" | a registered rule
StdMode = str  # "population" | "bessel" | "none"
Baseline = str  # "mean" | "leave_one_out"


@dataclass(frozen=True)
class AdvantageConfig:
    """How rewards become advantages. Defaults are AGPO's."""

    neg_rule: Rule = "constant"
    """Rule for negative responses (r <= tau). AGPO: constant (negative-dominant)."""
    neg_weight: float = 1.0
    """w_neg: scale of the negative rule."""
    pos_rule: Rule = "group"
    """Rule for positive responses (r > tau). AGPO: group z-score."""
    pos_weight: float = 0.1
    """w_pos: scale of the positive rule (W-REINFORCE's lambda when the rule is constant)."""
    std: StdMode = "population"
    """Group std used by the `group` rule: population (ddof 0), bessel (ddof 1, GRPO as in
    TRL/verl), or none (no division: Dr. GRPO)."""
    eps: float = 1e-6
    """Added to the std before dividing, so that constant groups give 0, not NaN."""
    baseline: Baseline = "mean"
    """Baseline the group rule subtracts: the group mean (GRPO), or leave_one_out, the mean
    of the other G - 1 responses (RLOO: A_i = G / (G - 1) * (r_i - mu))."""
    batch_norm: bool = False
    """Whiten the advantages over the batch after the rules (REINFORCE++ with baseline):
    A <- (A - mean(A)) / (std(A) + eps), mean and std (Bessel's correction) over the responses
    of the groups that carry signal; a group whose advantages are all 0 stays exactly 0 and is
    left out of the statistics (`whiten`). The batch is one call's rewards."""
    pos_adv_max: float | None = None
    """Optional cap on positive advantages (a rare correct path can otherwise get a large one)."""
    tau: float = 0.5
    """Polarity threshold: a response is positive when its reward is strictly above tau."""

    def __post_init__(self) -> None:
        for name in ("neg_rule", "pos_rule"):
            value = getattr(self, name)
            if value not in RULES.names():
                raise ValueError(
                    f"AdvantageConfig.{name}={value!r}: must be one of {', '.join(RULES.names())}"
                )
        if self.baseline not in ("mean", "leave_one_out"):
            raise ValueError(
                f"AdvantageConfig.baseline={self.baseline!r}: must be 'mean' or 'leave_one_out'"
            )
        if self.std not in ("population", "bessel", "none"):
            raise ValueError(
                f"AdvantageConfig.std={self.std!r}: must be 'population', 'bessel' or 'none'"
            )
        for name in ("neg_weight", "pos_weight", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"AdvantageConfig.{name}={getattr(self, name)} must be >= 0")
        if self.pos_adv_max is not None and self.pos_adv_max < 0:
            raise ValueError(f"AdvantageConfig.pos_adv_max={self.pos_adv_max} must be >= 0")


PRESETS: dict[str, AdvantageConfig] = {
    "agpo": AdvantageConfig(),
    "grpo": AdvantageConfig(
        neg_rule="group", neg_weight=1.0, pos_rule="group", pos_weight=1.0, std="bessel"
    ),
    "dr_grpo": AdvantageConfig(
        neg_rule="group", neg_weight=1.0, pos_rule="group", pos_weight=1.0, std="none"
    ),
    "w_reinforce": AdvantageConfig(
        neg_rule="constant", neg_weight=1.0, pos_rule="constant", pos_weight=0.1
    ),
    "nsr": AdvantageConfig(neg_rule="constant", neg_weight=1.0, pos_rule="none"),
    "psr": AdvantageConfig(neg_rule="none", pos_rule="constant", pos_weight=1.0),
    "rloo": AdvantageConfig(
        neg_rule="group",
        neg_weight=1.0,
        pos_rule="group",
        pos_weight=1.0,
        std="none",
        baseline="leave_one_out",
    ),
    "reinforce_pp": AdvantageConfig(
        neg_rule="group",
        neg_weight=1.0,
        pos_rule="group",
        pos_weight=1.0,
        std="none",
        batch_norm=True,
    ),  # fmt: skip
    "gspo": AdvantageConfig(
        neg_rule="group", neg_weight=1.0, pos_rule="group", pos_weight=1.0, std="bessel"
    ),
}
"""Named algorithms. Dr. GRPO also needs the `seq-sum-constant` loss aggregation, GSPO the
sequence-level ratio (`PolicyLossConfig.ratio_level="sequence"`): conf/algorithm/*.yaml."""


def resolve(algorithm: str | AdvantageConfig = "agpo", **overrides) -> AdvantageConfig:
    """A preset by name (or a config), with fields overridden by keyword."""
    if isinstance(algorithm, AdvantageConfig):
        base = algorithm
    else:
        if algorithm not in PRESETS:
            raise ValueError(f"unknown algorithm {algorithm!r}; known: {sorted(PRESETS)}")
        base = PRESETS[algorithm]
    fields = {f.name for f in dataclasses.fields(AdvantageConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown advantage option(s) {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(base, **overrides)


def _check_rewards(rewards: torch.Tensor, group_size: int) -> None:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D (num_prompts * group_size,), got shape {tuple(rewards.shape)}"
        )
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards are not divisible by group_size={group_size}: "
            "rewards must be ordered group by group, G per prompt"
        )
    bad = ~torch.isfinite(rewards)
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"rewards contain {int(bad.sum())} non-finite value(s) at index {idx} "
            f"(group {[i // group_size for i in idx]})"
        )


def advantages(
    rewards: torch.Tensor,
    group_size: int,
    algorithm: str | AdvantageConfig = "agpo",
    **overrides,
) -> torch.Tensor:
    """One advantage per response.

    rewards: 1-D, length num_prompts * group_size, ordered group by group.
    Returns a tensor of rewards' shape, in float32 (float64 if the rewards are float64).
    """
    cfg = resolve(algorithm, **overrides)
    _check_rewards(rewards, group_size)
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r_GN = rewards.to(dtype).view(-1, group_size)  # [groups, G]
    positive = r_GN > cfg.tau
    scores: list[torch.Tensor] = []

    def group_score() -> torch.Tensor:
        if not scores:
            scores.append(_group_score(r_GN, cfg))
        return scores[0]

    pos = RULES.get(cfg.pos_rule).build(r_GN, group_score, cfg.pos_weight, +1.0, cfg)
    if cfg.pos_adv_max is not None:
        pos = pos.clamp(max=cfg.pos_adv_max)
    neg = RULES.get(cfg.neg_rule).build(r_GN, group_score, cfg.neg_weight, -1.0, cfg)
    adv = torch.where(positive, pos, neg).view(-1)
    if cfg.batch_norm:
        adv = whiten(adv, group_size, cfg)
    return adv


def whiten(adv: torch.Tensor, group_size: int, cfg: AdvantageConfig) -> torch.Tensor:
    """REINFORCE++'s batch whitening over the groups that carry signal.

    adv: [B] per-response advantages before whitening, group by group. A group whose
    advantages are all exactly 0 (no signal: the zero_advantage filter drops it) stays 0 and
    is not counted; the other rows get (A - mean) / (std + eps), mean and std (Bessel's
    correction) over those rows only. Whitening the kept groups of several sampling rounds at
    once is calling this on their concatenation.
    """
    if adv.dim() != 1 or adv.numel() % group_size:
        raise ValueError(
            f"advantages {tuple(adv.shape)} must be 1-D and split into groups of {group_size}"
        )
    live = (adv.view(-1, group_size) != 0).any(dim=1).repeat_interleave(group_size)
    vals = adv[live]
    if vals.numel() == 0:
        return torch.zeros_like(adv)
    sd = vals.std(correction=1) if vals.numel() > 1 else torch.zeros((), dtype=adv.dtype)
    out = torch.zeros_like(adv)
    out[live] = (vals - vals.mean()) / (sd + cfg.eps)
    return out
