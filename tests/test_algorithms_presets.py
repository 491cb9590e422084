"""Every conf/algorithm preset composes and selects what its paper prescribes."""

import pathlib

import pytest

from megatron_agpo.algorithms import PRESETS
from megatron_agpo.trainer.compose import load_config

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf" / "algorithm"


def test_every_preset_has_a_config_file_and_back():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_composes(name):
    cfg = load_config([f"algorithm={name}"])
    adv, loss = cfg.algorithm.advantage_config(), cfg.algorithm.loss
    assert adv == PRESETS[name]
    if name == "gspo":
        assert loss.ratio_level == "sequence" and loss.agg_mode == "seq-mean-token-mean"
        assert (loss.eps_low, loss.eps_high, loss.dual_clip_c) == (3e-4, 4e-4, None)
    else:
        assert loss.ratio_level == "token"
    if name == "dr_grpo":
        assert loss.agg_mode == "seq-sum-constant" and loss.norm_constant is None
    assert adv.baseline == ("leave_one_out" if name == "rloo" else "mean")
    assert adv.batch_norm == (name == "reinforce_pp")
