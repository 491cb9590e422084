"""A short, printed tour of the algorithms: advantages per preset, and the loss split by polarity.

.venv/bin/python -m megatron_agpo.demo
"""

from __future__ import annotations

import torch

from megatron_agpo.algorithms import PRESETS, PolicyLossConfig, advantages, policy_loss


def advantage_table(group_size: int = 8) -> str:
    """Advantage of a correct and of a wrong response, for c of G correct, per preset."""
    lines = [
        f"Advantages in a group of G={group_size} binary rewards with c correct "
        "(correct / wrong response):",
        "| algorithm | " + " | ".join(f"c={c}" for c in range(group_size + 1)) + " |",
        "|---|" + "---|" * (group_size + 1),
    ]
    for name in PRESETS:
        cells = []
        for c in range(group_size + 1):
            r = torch.tensor([1.0] * c + [0.0] * (group_size - c), dtype=torch.float64)
            a = advantages(r, group_size, name)
            pos = f"{a[0].item():+.2f}" if c > 0 else "  -  "
            neg = f"{a[-1].item():+.2f}" if c < group_size else "  -  "
            cells.append(f"{pos} / {neg}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def polarity_demo(seed: int = 0) -> str:
    """One synthetic batch through the policy loss, metrics split by advantage sign."""
    g = torch.Generator().manual_seed(seed)
    prompts, group, t = 4, 8, 16
    rewards = (torch.rand(prompts * group, generator=g) < 0.3).double()
    logp = -torch.rand(prompts * group, t, generator=g, dtype=torch.float64) * 2
    old = logp + 0.2 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    mask = torch.ones_like(logp)
    lines = [f"Policy loss on {prompts} prompts x G={group}, pass rate {rewards.mean():.2f}:"]
    lines.append(
        "| algorithm | loss | pos loss | neg loss | pos clip | neg clip | pos/neg tokens |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for name in ("agpo", "grpo", "w_reinforce", "nsr"):
        adv = advantages(rewards, group, name)
        loss, m = policy_loss(logp, old, adv, mask, PolicyLossConfig())
        lines.append(
            f"| {name} | {loss.item():+.4f} | {m['pos/loss']:+.4f} | {m['neg/loss']:+.4f} | "
            f"{m['pos/clip_frac']:.3f} | {m['neg/clip_frac']:.3f} | "
            f"{m['pos/tokens']:.0f}/{m['neg/tokens']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    print(advantage_table())
    print()
    print(polarity_demo())


if __name__ == "__main__":
    main()
