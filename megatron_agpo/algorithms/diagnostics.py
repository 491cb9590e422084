"""How noisy is each algorithm's policy gradient? A closed model that needs no training.

One prompt, a softmax policy over M answers of which one is correct with probability p (the
pass rate), the wrong ones sharing 1 - p. A batch is B groups of G samples; each algorithm's
advantages (`advantages`) weight the score function of each sample,

    g = 1/(B G) sum_i A_i (e_{y_i} - pi)        (the logits' gradient, one token per answer)

and the quantity of interest is the signal-to-noise ratio SNR = |E g|^2 / E|g - E g|^2 of one
batch's gradient, by Monte Carlo. By symmetry E g is along the true gradient of p for every
algorithm here, so SNR says how many batches it takes for the signal to beat the noise.
Adam rescales the gradient, so at one learning rate a lower SNR means larger random steps.

    .venv/bin/python -m megatron_agpo.algorithms.diagnostics   # the table in docs/ALGORITHM.md
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_agpo.algorithms.advantages import AdvantageConfig, advantages, resolve, whiten


@dataclass(frozen=True)
class NoiseModel:
    """The closed model's settings (the tiny default run's shape by default)."""

    answers: int = 20
    """M: distinct answers the policy can give."""
    group_size: int = 8
    """G: samples per prompt (rollout.n)."""
    groups: int = 16
    """B: prompts per batch (data.prompts_per_step)."""
    batches: int = 20000
    """Monte Carlo batches."""
    seed: int = 0
    """Generator seed."""


def gradient_snr(
    algorithm: str | AdvantageConfig, pass_rate: float, model: NoiseModel = NoiseModel()
) -> dict[str, float]:
    """SNR of one batch's gradient, the size of its mean along the true gradient of p (per
    unit of |grad p|), and its noise, for `algorithm` at `pass_rate` p."""
    if not 0 < pass_rate < 1:
        raise ValueError(f"pass_rate={pass_rate} must be in (0, 1)")
    m, g, b, n = model.answers, model.group_size, model.groups, model.batches
    pi = torch.full((m,), (1 - pass_rate) / (m - 1), dtype=torch.float64)
    pi[0] = pass_rate  # answer 0 is the correct one
    gen = torch.Generator().manual_seed(model.seed)
    y = torch.multinomial(pi, n * b * g, replacement=True, generator=gen)  # [N*B*G]
    rewards = (y == 0).to(torch.float64)
    cfg = resolve(algorithm)
    # Batch whitening (REINFORCE++) is over one batch, as the trainer does it, not over all
    # N batches at once (which would be one constant scale, changing no SNR).
    adv = advantages(rewards, g, cfg, batch_norm=False).view(n, b * g)
    if cfg.batch_norm:
        adv = torch.stack([whiten(row, g, cfg) for row in adv])
    # sum_i A_i (e_{y_i} - pi) per batch, without materialising the one-hot vectors
    weighted = torch.zeros(n, m, dtype=torch.float64).scatter_add_(1, y.view(n, b * g), adv)
    grads = (weighted - adv.sum(dim=1, keepdim=True) * pi) / (b * g)  # [N, M]
    mean = grads.mean(dim=0)
    noise = float(((grads - mean) ** 2).sum(dim=1).mean())
    true = pass_rate * (torch.nn.functional.one_hot(torch.tensor(0), m).double() - pi)
    along = float(mean @ true / true.norm() ** 2)  # E g = along * grad p
    return {"snr": float(mean @ mean) / noise, "along": along, "noise": noise}


def snr_table(pass_rates=(0.05, 0.16, 0.3, 0.5), model: NoiseModel = NoiseModel()) -> str:
    """Markdown table of SNR per preset (rows) and pass rate (columns)."""
    from megatron_agpo.algorithms.advantages import PRESETS

    head = "| algorithm | " + " | ".join(f"p = {p}" for p in pass_rates) + " |"
    lines = [head, "|---|" + "---|" * len(pass_rates)]
    for name in PRESETS:
        if name == "gspo":  # GRPO's advantages; the difference is in the ratio
            continue
        cells = [f"{gradient_snr(name, p, model)['snr']:.3f}" for p in pass_rates]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(snr_table())
