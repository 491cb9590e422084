"""Metrics declare how they aggregate (`metric_layout`): no key is read off its prefix."""

from __future__ import annotations

import torch

from megatron_agpo.algorithms import PolicyLossConfig
from megatron_agpo.trainer.step import StepMetrics, metric_layout


def test_every_mean_is_over_a_count_of_the_layout():
    for cfg in (PolicyLossConfig(), PolicyLossConfig(kl_coef=0.1, tis_cap=None)):
        layout = metric_layout(cfg)
        counts = {n for n, per in layout.items() if per is None}
        assert counts == {"pos/tokens", "neg/tokens", "all/tokens"}
        assert {per for per in layout.values() if per} <= counts
        assert ("all/kl" in layout) == (cfg.kl_coef != 0)


def test_to_dict_uses_the_declared_count_whatever_the_name():
    # 'gap' has no pos/neg/all prefix, 'pos/x' is declared over neg's count: the declaration
    # decides, and nothing is dropped.
    m = StepMetrics(
        ["pos/tokens", "neg/tokens", "gap", "pos/x"],
        torch.tensor([4.0, 2.0, 6.0, 8.0], dtype=torch.float64),
        [None, None, "pos/tokens", "neg/tokens"],
    )
    assert m.to_dict() == {"pos/tokens": 4.0, "neg/tokens": 2.0, "gap": 1.5, "pos/x": 4.0}
    empty = StepMetrics(["n", "v"], torch.zeros(2, dtype=torch.float64), [None, "n"])
    assert torch.isnan(torch.tensor(empty.to_dict()["v"]))
