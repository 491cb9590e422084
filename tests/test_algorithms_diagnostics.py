"""The gradient-noise model against closed forms (NSR's gradient, exactly)."""

import pytest
import torch

from megatron_agpo.algorithms.diagnostics import NoiseModel, gradient_snr

MODEL = NoiseModel(batches=4000)


def nsr_closed_form(p: float, m: NoiseModel) -> tuple[float, float]:
    # One sample's term X = -1{y wrong} (e_y - pi): E X = p (e_0 - pi) = grad p exactly, and
    # E|X|^2 = sum_{y wrong} pi_y |e_y - pi|^2 = sum_{y wrong} pi_y (1 - 2 pi_y + |pi|^2).
    pi = torch.full((m.answers,), (1 - p) / (m.answers - 1), dtype=torch.float64)
    pi[0] = p
    e0 = torch.zeros_like(pi)
    e0[0] = 1
    mean = p * (e0 - pi)
    second = float((pi[1:] * (1 - 2 * pi[1:] + (pi @ pi))).sum())
    noise = (second - float(mean @ mean)) / (m.groups * m.group_size)
    return float(mean @ mean) / noise, noise


@pytest.mark.parametrize("p", [0.16, 0.5])
def test_nsr_matches_closed_form(p):
    snr, noise = nsr_closed_form(p, MODEL)
    got = gradient_snr("nsr", p, MODEL)
    assert got["along"] == pytest.approx(1.0, abs=0.05)  # NSR is unbiased for grad p
    assert got["noise"] == pytest.approx(noise, rel=0.05)
    assert got["snr"] == pytest.approx(snr, rel=0.1)


def test_negative_dominant_gradients_are_noisier_at_low_pass_rate():
    s = {a: gradient_snr(a, 0.16, MODEL)["snr"] for a in ("grpo", "agpo", "nsr", "w_reinforce")}
    assert (
        s["grpo"] > 4 * s["agpo"] and s["grpo"] > 4 * s["nsr"] and s["grpo"] > 4 * s["w_reinforce"]
    )
    # W-REINFORCE's expected gradient: 1 (negatives) + 0.1 (positives) times grad p.
    assert gradient_snr("w_reinforce", 0.16, MODEL)["along"] == pytest.approx(1.1, abs=0.06)


def test_reinforce_pp_is_whitened_per_batch():
    # The trainer whitens one batch at a time; the noise model must too. Reference: the same
    # samples, each batch's advantages computed by its own `advantages` call.
    from megatron_agpo.algorithms import advantages

    m, p = NoiseModel(batches=300), 0.16
    pi = torch.full((m.answers,), (1 - p) / (m.answers - 1), dtype=torch.float64)
    pi[0] = p
    gen = torch.Generator().manual_seed(m.seed)
    n, bg = m.batches, m.groups * m.group_size
    y = torch.multinomial(pi, n * bg, replacement=True, generator=gen).view(n, bg)
    grads = []
    for row in y:
        adv = advantages((row == 0).double(), m.group_size, "reinforce_pp")
        onehot = torch.nn.functional.one_hot(row, m.answers).double()
        grads.append(((onehot - pi) * adv[:, None]).sum(0) / bg)
    g = torch.stack(grads)
    mean = g.mean(0)
    snr = float(mean @ mean) / float(((g - mean) ** 2).sum(1).mean())
    got = gradient_snr("reinforce_pp", p, m)["snr"]
    assert got == pytest.approx(snr, rel=1e-9)
    assert got != pytest.approx(gradient_snr("dr_grpo", p, m)["snr"], rel=1e-3)
