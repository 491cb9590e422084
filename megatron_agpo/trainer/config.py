"""The run's configuration: one dataclass per component, composed into `TrainConfig`.

Each component's defaults live in its own dataclass (some in the component's module:
`PolicyLossConfig`, `ParallelConfig`, `OptimizerSettings`, `RolloutConfig`, `RewardConfig`).
`conf/*.yaml` only selects and overrides; `register_configs` makes the schema known to Hydra so
unknown keys fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_agpo.algorithms import AdvantageConfig, PolicyLossConfig, resolve
from megatron_agpo.data.relevance import RelevanceDataConfig
from megatron_agpo.parallel import OptimizerSettings, ParallelConfig
from megatron_agpo.plan.cluster import ClusterSection
from megatron_agpo.rewards.math import RewardConfig
from megatron_agpo.rewards.relevance import RelevanceRewardConfig
from megatron_agpo.rollout.config import RolloutConfig


@dataclass
class AlgorithmConfig:
    """Advantage preset (with optional per-field overrides) and the surrogate loss."""

    name: str = "agpo"
    """Preset: agpo, grpo, dr_grpo, w_reinforce, nsr or psr (megatron_agpo.algorithms.PRESETS)."""
    neg_rule: str | None = None
    """Override of the preset's negative rule (constant, group, none); None keeps the preset's."""
    neg_weight: float | None = None
    """Override of w_neg."""
    pos_rule: str | None = None
    """Override of the preset's positive rule."""
    pos_weight: float | None = None
    """Override of w_pos (W-REINFORCE's lambda for a constant rule)."""
    std: str | None = None
    """Override of the group std: population, bessel or none."""
    pos_adv_max: float | None = None
    """Cap on positive advantages (None: the preset's, i.e. no cap)."""
    tau: float | None = None
    """Override of the polarity threshold."""
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    """The per-token surrogate and its aggregation."""

    def advantage_config(self) -> AdvantageConfig:
        names = ("neg_rule", "neg_weight", "pos_rule", "pos_weight", "std", "pos_adv_max", "tau")
        overrides = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        return resolve(self.name, **overrides)


@dataclass
class ModelSection:
    """The policy: an HF checkpoint, or the tiny model built and warm-started here."""

    hf_path: str = ""
    """HF folder (config.json, safetensors, tokenizer). Empty: the tiny model below."""
    params_dtype: str = "float32"
    """Training dtype of the policy: float32 or bfloat16."""
    tiny_hidden: int = 128
    """Tiny model: width."""
    tiny_layers: int = 4
    """Tiny model: layers."""
    tiny_heads: int = 4
    """Tiny model: attention heads (KV heads are half of them; divisible by TP=2)."""
    tiny_ffn: int = 512
    """Tiny model: SwiGLU width."""
    tiny_max_len: int = 64
    """Tiny model: context length (prompt + response)."""
    reference_hf_path: str = ""
    """Reference policy for the KL term (only loaded when algorithm.loss.kl_coef != 0).
    Empty: the policy's own starting weights."""
    warmstart_steps: int = 1200
    """Supervised warm-start steps on the arithmetic task before RL (0: none)."""
    warmstart_lr: float = 3e-3
    """Warm-start learning rate (AdamW, cosine to 10%)."""
    warmstart_batch: int = 64
    """Warm-start sequences per step."""
    cache_dir: str = "~/.cache/megatron_agpo"
    """Where the warm-started tiny model is cached (keyed by its settings)."""


@dataclass
class DataSection:
    """Prompts: the synthetic arithmetic task or a MATH-style / verl file."""

    kind: str = "arithmetic"
    """arithmetic or math_jsonl (JSONL/parquet with {problem, answer} or verl rows)."""
    path: str = ""
    """math_jsonl: the file."""
    format: str = "problem"
    """math_jsonl: problem ({problem, answer}) or verl (prompt messages, reward_model)."""
    levels: list[int] = field(default_factory=lambda: [1])
    """arithmetic: difficulty levels (megatron_agpo.data.arithmetic.LEVELS)."""
    warmstart_levels: list[int] = field(default_factory=lambda: [1, 2])
    """arithmetic: levels the warm start sees (the RL task may be harder)."""
    num_train: int = 87
    """arithmetic: training problems (level 1 has 87 train / 13 held-out expressions)."""
    num_eval: int = 13
    """arithmetic: held-out problems for evaluation."""
    prompts_per_step: int = 16
    """Prompts per rollout batch (each sampled rollout.n times)."""
    max_prompt_tokens: int = 1024
    """Longer prompts are filtered out and counted, never truncated."""
    seed: int = 0
    """Generator and shuffle seed."""
    relevance: RelevanceDataConfig = field(default_factory=RelevanceDataConfig)
    """data.kind=relevance: pairs, label set and prompt template (megatron_agpo.data.relevance)."""


@dataclass
class RolloutSection:
    """How responses are sampled; `engine` configures the vLLM deployment."""

    mode: str = "replicas"
    """replicas (separate vLLM processes) or colocated (vLLM inside the trainer's rank 0)."""
    n: int = 8
    """Samples per prompt: the group size G."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus mass."""
    max_new_tokens: int = 16
    """Response length limit."""
    engine: RolloutConfig = field(default_factory=RolloutConfig)
    """The vLLM engine(s); model_path is filled from the policy when empty."""


@dataclass
class TrainerSection:
    """The loop."""

    steps: int = 60
    """RL steps (rollout batches)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward micro-batch (at most, with a token budget)."""
    token_budget: int = 0
    """Dynamic batch size: padded tokens (rows x longest row) per micro-batch; rows are sorted
    by length and packed greedily, a longer row runs alone. 0: micro_batch_size rows each."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per pass (the rollout batch is split into this many)."""
    old_logp: str = "recompute"
    """recompute (the trainer's own log-probs before the update, with a truncated importance
    weight against the engine's) or rollout (the engine's log-probs as old log-probs)."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: responses cut at rollout.max_new_tokens get no loss (they still
    count in their group's advantages); the share is logged as response/overlong_filtered."""
    dynamic_sampling: str = "off"
    """DAPO's dynamic sampling: drop groups that carry no learning signal and sample more prompts
    until data.prompts_per_step groups remain. off; zero_advantage (drop groups whose
    advantages are all 0: for AGPO only all-correct groups, since all-wrong groups still get
    -w_neg); identical_rewards (DAPO's rule: also drops all-wrong groups)."""
    max_sampling_rounds: int = 4
    """Dynamic sampling: rollout batches tried per step; if the batch is still short after
    them, the step trains on the groups it has and logs groups/kept below prompts_per_step."""
    max_skipped_steps: int = 3
    """Stop after this many consecutive steps skipped for a non-finite loss or grad norm."""
    eval_every: int = 20
    """Evaluate pass@k on held-out prompts every this many steps (0: never; also at the end)."""
    eval_n: int = 16
    """Samples per held-out prompt for pass@k (k = 1, 2, 4, ... eval_n)."""
    seed: int = 1234
    """Seed of the run: model init, sampling seeds, shuffling."""


@dataclass
class SchedulerSection:
    """Learning-rate schedule over optimizer updates (megatron's OptimizerParamScheduler)."""

    warmup_steps: int = 0
    """Linear warm-up from 0 over this many updates."""
    decay_style: str = "constant"
    """constant, linear or cosine (to min_lr at decay_steps)."""
    min_lr: float = 0.0
    """Floor of the decay."""
    decay_steps: int = 0
    """Updates over which the lr decays; 0: every update of the run (steps x ppo_epochs x
    mini_batches)."""


@dataclass
class CheckpointSection:
    """Run checkpoints (model, optimizer, RNG, data position, step)."""

    save_every: int = 0
    """Save every this many steps (0: only at the end)."""
    resume: str = "auto"
    """auto (the latest complete checkpoint in the run dir, if any), none, or a path."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    save_final: bool = True
    """Save at the end of the run (when the last step was not saved already)."""


@dataclass
class LoggingSection:
    """What the run leaves behind."""

    run_dir: str = "runs/default"
    """Everything goes here: config.yaml, metrics.jsonl, plots, checkpoints, hf/."""
    tensorboard: bool = True
    """Also write TensorBoard events (when tensorboard is installed)."""
    progress: bool = True
    """Console progress bar."""


@dataclass
class RewardSection:
    """The task's reward: `name` picks a registered reward (megatron_agpo.rewards.registry),
    which reads its own sub-config below."""

    name: str = "math"
    """math, relevance, or a name added with `megatron_agpo.rewards.register_reward`."""
    math: RewardConfig = field(default_factory=RewardConfig)
    """The math reward (math-verify in workers under a deadline)."""
    relevance: RelevanceRewardConfig = field(default_factory=RelevanceRewardConfig)
    """The relevance reward (one boxed label against the gold label)."""


@dataclass
class TrainConfig:
    """A whole AGPO run."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(tensor_parallel=2))
    rollout: RolloutSection = field(default_factory=RolloutSection)
    data: DataSection = field(default_factory=DataSection)
    reward: RewardSection = field(default_factory=RewardSection)
    optimizer: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=1e-4))
    trainer: TrainerSection = field(default_factory=TrainerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    """The cluster `agpo-plan` sizes this run for (megatron_agpo.plan); the trainer ignores it."""
    nproc: int = 2
    """Processes to start when `agpo-train` runs outside torchrun/srun (CPU default: 2)."""

    def validate(self) -> None:
        """Checks across sections; each section validates its own fields."""
        self.algorithm.advantage_config()  # raises on an unknown preset or rule
        if self.rollout.mode not in ("replicas", "colocated"):
            raise ValueError(f"rollout.mode={self.rollout.mode!r}: replicas or colocated")
        if self.trainer.old_logp not in ("recompute", "rollout"):
            raise ValueError(f"trainer.old_logp={self.trainer.old_logp!r}: recompute or rollout")
        if self.data.kind not in ("arithmetic", "math_jsonl"):
            raise ValueError(f"data.kind={self.data.kind!r}: arithmetic or math_jsonl")
        if self.data.kind == "math_jsonl" and not self.data.path:
            raise ValueError("data.kind=math_jsonl needs data.path")
        if self.rollout.n < 2 and "group" in (
            self.algorithm.advantage_config().pos_rule,
            self.algorithm.advantage_config().neg_rule,
        ):
            raise ValueError(f"rollout.n={self.rollout.n}: a group advantage needs n >= 2")
        total = self.data.prompts_per_step * self.rollout.n
        if total % self.trainer.mini_batches:
            raise ValueError(
                f"{total} sequences per step (data.prompts_per_step x rollout.n) do not split "
                f"into trainer.mini_batches={self.trainer.mini_batches}"
            )
        if self.trainer.dynamic_sampling not in ("off", "zero_advantage", "identical_rewards"):
            raise ValueError(
                f"trainer.dynamic_sampling={self.trainer.dynamic_sampling!r}: off, "
                "zero_advantage or identical_rewards"
            )
        if self.trainer.max_sampling_rounds < 1:
            raise ValueError(f"trainer.max_sampling_rounds={self.trainer.max_sampling_rounds} < 1")
        if self.trainer.token_budget < 0:
            raise ValueError(f"trainer.token_budget={self.trainer.token_budget} < 0")
        if self.scheduler.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"scheduler.decay_style={self.scheduler.decay_style!r}: constant, linear or cosine"
            )
        if self.scheduler.min_lr > self.optimizer.lr:
            raise ValueError(
                f"scheduler.min_lr={self.scheduler.min_lr} > optimizer.lr={self.optimizer.lr}"
            )
        if self.scheduler.warmup_steps >= self.total_updates():
            raise ValueError(
                f"scheduler.warmup_steps={self.scheduler.warmup_steps} must be below the run's "
                f"{self.total_updates()} updates (decay_steps or steps x ppo_epochs x mini_batches)"
            )
        if self.trainer.micro_batch_size < 1:
            raise ValueError(f"trainer.micro_batch_size={self.trainer.micro_batch_size} < 1")

    def total_updates(self) -> int:
        """Optimizer updates the schedule spans."""
        t = self.trainer
        return self.scheduler.decay_steps or t.steps * t.ppo_epochs * t.mini_batches


def register_configs() -> None:
    """Register TrainConfig as Hydra's schema for conf/train.yaml."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
