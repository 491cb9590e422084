"""Components own their configs: a user reward's settings from the command line, every
section's problems named by key, the planner's cluster section outside the run's config."""

from __future__ import annotations

import pytest

from megatron_agpo.rewards import build_reward
from megatron_agpo.trainer.compose import UsageError, iter_keys, load_config

PLUGIN = "imports=[tests.plugin_reward]"


def test_a_user_reward_reads_its_own_settings_from_the_command_line():
    cfg = load_config([PLUGIN, "reward.name=length", "reward.length.target=2",
                       "reward.length.penalty=0.25"])  # fmt: skip
    assert cfg.imports == ["tests.plugin_reward"]
    assert (cfg.reward.length.target, cfg.reward.length.penalty) == (2, 0.25)
    reward = build_reward(cfg.reward)
    assert reward.score_batch(["ab", "abc"], ["", ""]) == [1.0, 0.25]
    assert "reward.length.target" in dict(iter_keys())


def test_a_user_reward_setting_is_checked_by_key():
    with pytest.raises(UsageError, match=r"reward\.length\.targt: no such key .*target"):
        load_config([PLUGIN, "reward.name=length", "reward.length.targt=2"])
    with pytest.raises(ValueError, match=r"reward\.length\.target=0: must be >= 1"):
        load_config([PLUGIN, "reward.name=length", "reward.length.target=0"])


def test_an_import_that_fails_is_one_line_naming_the_module():
    with pytest.raises(UsageError, match=r"imports: cannot import 'no_such_module_x'"):
        load_config(["imports=[no_such_module_x]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.loss.eps_low=2", r"algorithm\.loss\.eps_low=2\.0: must be in \[0, 1\)"),
        ("rollout.engine.num_replicas=0", r"rollout\.engine\.num_replicas=0 is out of range"),
        ("reward.math.retries=-1", r"reward\.math\.retries=-1: must be in \[0, 10\]"),
        ("logging.existing=keep", r"logging\.existing='keep': refuse, archive or overwrite"),
        ("parallel.tensor_parallel=0", r"parallel\.tensor_parallel=0: must be >= 1"),
        ("optimizer.lr=0", r"optimizer\.lr=0\.0: must be > 0"),
        ("data.kind=nope", r"data\.kind='nope': one of arithmetic, math_jsonl, relevance"),
        ("data.format=xml", r"^data\.format='xml': problem or verl$"),
        ("data.prompt.problem_key=''", r"^data\.prompt\.problem_key='': must name a field$"),
        ("data.prompt.answer_key=problem", r"^data\.prompt\.answer_key='problem': must differ"),
    ],
)
def test_every_section_names_the_full_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([override])


def test_math_reward_settings_can_be_overridden():
    """reward.math was a frozen dataclass: Hydra refused every reward.math.* override."""
    assert load_config(["reward.math.timeout_s=7.5"]).reward.math.timeout_s == 7.5


def test_the_cluster_belongs_to_the_planner():
    from megatron_agpo.plan.config import PlanConfig, load_plan_config

    cfg = load_config(["model=llama3_70b"], validate=False)
    assert not hasattr(cfg, "cluster")
    assert not [k for k, _ in iter_keys() if k.startswith("cluster.")]
    with pytest.raises(UsageError, match=r"cluster\.nodes: .* belongs to agpo-plan"):
        load_config(["cluster.nodes=2"])
    plan = load_plan_config(["model=llama3_70b", "cluster.gpu=h200"])
    assert isinstance(plan, PlanConfig)
    # conf/model/llama3_70b.yaml's cluster block, and the override on top of it.
    assert (plan.cluster.nodes, plan.cluster.gpu) == (8, "h200")
    with pytest.raises(UsageError, match=r"cluster\.nodez: no such key \(did you mean"):
        load_plan_config(["cluster.nodez=2"])
    with pytest.raises(UsageError, match=r"cluster\.nodes=0 must be >= 1"):
        load_plan_config(["cluster.nodes=0"])


def test_a_user_advantage_rule_is_one_registered_function():
    import torch

    from megatron_agpo.algorithms import advantages

    cfg = load_config([PLUGIN, "algorithm.pos_rule=rank", "algorithm.pos_weight=0.5"])
    adv_cfg = cfg.algorithm.advantage_config()
    r = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # one group of 4, tau 0.5
    # Positives get 0.5 x (2 rank / 3 - 1) with ranks 1, 2, 3 (stable); the negative -w_neg.
    expect = [0.5 * (2 * 1 / 3 - 1), -1.0, 0.5 * (2 * 2 / 3 - 1), 0.5 * (2 * 3 / 3 - 1)]
    assert advantages(r, 4, adv_cfg).tolist() == pytest.approx(expect, abs=1e-15)
    with pytest.raises(ValueError, match=r"algorithm\.pos_rule=.rnak.: must be one of .*rank"):
        load_config([PLUGIN, "algorithm.pos_rule=rnak"])


REL = r"data\.relevance\."


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.relevance.source=nope"], REL + r"source='nope': synthetic, file or esci"),
        (["data.relevance.source=file"], REL + r"source=file needs data\.relevance\.path"),
        (["data.relevance.prompt.template='{colour}'"], REL + r"prompt\.template: unknown"),
        (["data.relevance.labels=[A,B]", "data.relevance.codes=[]"],
         r"source=synthetic labels by ESCI's four grades"),
        (["data.relevance.codes=[E,S,C,X]"], REL + r"codes=.* and reward\.relevance"),
    ],
)  # fmt: skip
def test_relevance_settings_are_checked_before_launch(overrides, message):
    """`data=relevance data.relevance.source=nope` used to pass the check and fail on every
    rank with a traceback."""
    with pytest.raises(ValueError, match=message):
        load_config(["data=relevance", "reward=relevance", *overrides])
