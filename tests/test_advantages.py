"""Advantages against closed forms and the textbook formula of each preset."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_agpo.algorithms import PRESETS, advantages, resolve


def binary_group(c: int, g: int) -> torch.Tensor:
    return torch.tensor([1.0] * c + [0.0] * (g - c), dtype=torch.float64)


@pytest.mark.parametrize("g", [2, 4, 8, 16])
@pytest.mark.parametrize("w_pos", [0.1, 0.5, 1.0])
def test_agpo_binary_group_closed_form(g, w_pos):
    for c in range(1, g):
        a = advantages(binary_group(c, g), g, "agpo", pos_weight=w_pos, eps=0.0)
        assert torch.allclose(
            a[:c], torch.full((c,), w_pos * math.sqrt((g - c) / c), dtype=a.dtype)
        )
        assert torch.equal(a[c:], torch.full((g - c,), -1.0, dtype=a.dtype))


def test_agpo_all_wrong_and_all_right():
    g = 8
    assert torch.equal(advantages(torch.zeros(g), g), torch.full((g,), -1.0))
    assert torch.equal(advantages(torch.ones(g), g), torch.zeros(g))
    # GRPO gives 0 in the all-wrong group; AGPO's negative-dominant rule does not.
    assert torch.equal(advantages(torch.zeros(g), g, "grpo"), torch.zeros(g))


def test_agpo_neg_weight_and_cap():
    r = binary_group(1, 8)
    a = advantages(r, 8, neg_weight=0.7, pos_weight=1.0, pos_adv_max=2.0)
    assert a[0].item() == 2.0  # sqrt(7) = 2.65 capped
    assert torch.all(a[1:] == -0.7)


def reference_grpo(r: torch.Tensor, g: int, eps: float = 1e-6) -> torch.Tensor:
    # The textbook GRPO advantage written out element by element with Python floats.
    out = []
    for k in range(0, len(r), g):
        grp = [float(x) for x in r[k : k + g]]
        mu = sum(grp) / g
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / (g - 1))
        out += [(x - mu) / (sd + eps) for x in grp]
    return torch.tensor(out, dtype=torch.float64)


def test_grpo_matches_textbook_with_continuous_rewards():
    torch.manual_seed(0)
    r = torch.rand(6 * 5, dtype=torch.float64)
    assert torch.allclose(advantages(r, 5, "grpo"), reference_grpo(r, 5), atol=1e-12)


def test_dr_grpo_is_mean_centred_reward():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.9], dtype=torch.float64)
    expect = torch.tensor([0.5, -0.5, -0.5, 0.5, -0.3, 0.3], dtype=torch.float64)
    assert torch.allclose(advantages(r, 2, "dr_grpo"), expect, atol=1e-12)


@pytest.mark.parametrize(
    "name,pos,neg", [("w_reinforce", 0.1, -1.0), ("nsr", 0.0, -1.0), ("psr", 1.0, 0.0)]
)
def test_constant_presets(name, pos, neg):
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    a = advantages(r, 3, name)
    assert torch.equal(a, torch.where(r > 0.5, torch.tensor(pos), torch.tensor(neg)))


def test_tau_threshold_is_strict():
    r = torch.tensor([0.5, 0.51, 0.2, 0.9])
    a = advantages(r, 4, "nsr")
    assert a.tolist() == [-1.0, 0.0, -1.0, 0.0]


def test_presets_are_the_documented_rules():
    assert PRESETS["agpo"].neg_rule == "constant" and PRESETS["agpo"].pos_rule == "group"
    assert PRESETS["agpo"].pos_weight == 0.1 and PRESETS["agpo"].std == "population"
    assert PRESETS["grpo"].std == "bessel"


@pytest.mark.parametrize(
    "rewards,g,match",
    [
        (torch.zeros(7), 4, "not divisible by group_size=4"),
        (torch.tensor([0.0, float("nan"), 1.0, 1.0]), 2, r"non-finite.*index \[1\].*group \[0\]"),
        (torch.zeros(2, 4), 4, "must be 1-D"),
        (torch.zeros(4), 0, "group_size must be a positive int"),
    ],
)
def test_bad_input_is_named(rewards, g, match):
    with pytest.raises(ValueError, match=match):
        advantages(rewards, g)


def test_unknown_algorithm_and_option():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(TypeError, match=r"unknown advantage option\(s\) \['w_pos'\]"):
        resolve("agpo", w_pos=0.3)
    with pytest.raises(ValueError, match="neg_rule='const'"):
        resolve("agpo", neg_rule="const")


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "agpo", "rloo", "gspo"])
def test_groups_of_one_get_zero_group_advantage(name):
    # One response has no baseline to compare with: the group rule gives 0 (it used to raise
    # for Bessel's std); AGPO's constant negative rule still applies to a wrong response.
    r = torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64)
    a = advantages(r, 1, name)
    expect = [0.0, -1.0, -1.0] if name == "agpo" else [0.0, 0.0, 0.0]
    assert a.tolist() == expect


rewards_st = st.integers(1, 6).flatmap(
    lambda g: st.tuples(
        st.just(g),
        st.lists(st.sampled_from([0.0, 1.0, 0.25, 0.75]), min_size=g, max_size=6 * g).map(
            lambda xs: xs[: len(xs) - len(xs) % g]
        ),
    )
)


@settings(max_examples=150, deadline=None)
@given(rewards_st, st.sampled_from(sorted(PRESETS)), st.randoms(use_true_random=False))
def test_properties(gr, name, rnd):
    g, xs = gr
    if not xs:
        return
    r = torch.tensor(xs, dtype=torch.float64)
    a = advantages(r, g, name)
    assert a.shape == r.shape and torch.isfinite(a).all()
    # Permuting responses within each group permutes their advantages the same way.
    perm = torch.cat([torch.tensor(rnd.sample(range(g), g)) + k for k in range(0, len(xs), g)])
    assert torch.allclose(advantages(r[perm], g, name), a[perm], atol=1e-12)
    # Permuting whole groups permutes the result by group.
    groups = list(range(len(xs) // g))
    rnd.shuffle(groups)
    gperm = torch.cat([torch.arange(k * g, (k + 1) * g) for k in groups])
    assert torch.allclose(advantages(r[gperm], g, name), a[gperm], atol=1e-12)
    # A constant group: the group rule gives exactly 0.
    const = advantages(torch.full((g,), 0.75, dtype=torch.float64), g, name)
    if PRESETS[name].pos_rule == "group":
        assert torch.all(const == 0)
