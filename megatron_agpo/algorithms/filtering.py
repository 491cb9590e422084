"""DAPO's batch filters as pure functions: which groups carry a learning signal, and which
responses are overlong.

Shape legend: B sequences = G groups x n samples, laid out group by group.
"""

from __future__ import annotations

import torch

GROUP_RULES = ("zero_advantage", "identical_rewards")


def informative_groups(
    rewards: torch.Tensor, advantages: torch.Tensor, n: int, rule: str
) -> torch.Tensor:
    """[G] bool: the groups dynamic sampling keeps.

    zero_advantage drops the groups whose advantages are all 0, i.e. the ones that contribute
    no gradient under the chosen algorithm (`advantages` gives a group without signal exactly
    0, also after REINFORCE++'s whitening, so the test is exact). identical_rewards is DAPO's
    rule (drop groups whose rewards are all equal); under AGPO it also drops all-wrong groups,
    whose constant negative advantage -w_neg is exactly the signal AGPO relies on.
    """
    if rewards.shape != advantages.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and advantages {tuple(advantages.shape)} must be "
            "the same [B] shape"
        )
    if n < 1 or rewards.shape[0] % n:
        raise ValueError(f"{rewards.shape[0]} sequences do not split into groups of n={n}")
    if rule == "zero_advantage":
        return (advantages.view(-1, n) != 0).any(dim=1)
    if rule == "identical_rewards":
        r = rewards.view(-1, n)
        return (r != r[:, :1]).any(dim=1)
    raise ValueError(f"unknown group filter {rule!r}: one of {GROUP_RULES}")


def group_rows(keep: torch.Tensor, n: int) -> torch.Tensor:
    """[B'] the sequence indices of the kept groups, in order."""
    return (keep.nonzero().flatten()[:, None] * n + torch.arange(n, device=keep.device)).flatten()


def overlong_filter(
    loss_mask_BS: torch.Tensor, target_BS: torch.Tensor, truncated_B: torch.Tensor, ignore: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPO's overlong filtering: the rows of responses cut at the token limit leave the loss
    (mask 0, target `ignore`); they still counted in their group's advantages. Returns new
    (loss_mask, target); the inputs are not modified."""
    if truncated_B.shape != loss_mask_BS.shape[:1]:
        raise ValueError(
            f"truncated {tuple(truncated_B.shape)} needs one flag per row of loss_mask "
            f"{tuple(loss_mask_BS.shape)}"
        )
    cut = truncated_B.to(device=loss_mask_BS.device, dtype=torch.bool)
    mask = loss_mask_BS.masked_fill(cut[:, None], 0.0)
    target = target_BS.masked_fill(cut[:, None], ignore)
    return mask, target
