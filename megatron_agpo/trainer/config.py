"""The run's configuration: one dataclass per component, composed into `TrainConfig`.

Each component's defaults live in its own dataclass (some in the component's module:
`PolicyLossConfig`, `ParallelConfig`, `OptimizerSettings`, `RolloutConfig`, `RewardConfig`).
`conf/*.yaml` only selects and overrides; `register_configs` makes the schema known to Hydra so
unknown keys fail.
"""

from __future__ import annotations

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
    batch_norm: bool | None = None
    """Override of whitening over the batch (REINFORCE++'s; on AGPO it puts the baseline at
    the batch mean, a stability diagnostic in docs/results)."""
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    """The per-token surrogate and its aggregation."""

    def advantage_config(self) -> AdvantageConfig:
        names = ("neg_rule", "neg_weight", "pos_rule", "pos_weight", "std", "pos_adv_max", "tau",
                 "batch_norm")  # fmt: skip
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
    fp8: str = "none"
    """FP8 training: none, e4m3 or hybrid (e4m3 forward, e5m2 gradients). Needs Transformer
    Engine on a CUDA GPU (compute capability 8.9+); elsewhere the config is refused."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: delayed, tensorwise, blockwise (Hopper+) or mxfp8 (Blackwell)."""
    fp8_param_gather: bool = False
    """Keep FP8 copies of the weights and all-gather them in FP8 (needs fp8 and
    parallel.use_distributed_optimizer)."""
    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layer out of FP8 (not with fp8_recipe=delayed)."""

    def precision_problems(
        self, use_distributed_optimizer: bool = True, rollout_quantization: str = ""
    ) -> list[str]:
        """Problems of the FP8 fields (and of FP8 rollouts), one line each naming the key:
        values, combinations, and whether this machine has Transformer Engine on a capable
        GPU."""
        import torch

        from megatron_agpo.models.precision import check_fp8_available, check_fp8_settings

        out = []
        if rollout_quantization == "fp8" and not torch.cuda.is_available():
            out.append(
                "rollout.engine.quantization=fp8 needs vLLM on a CUDA GPU, and CUDA is not "
                "available here; leave rollout.engine.quantization empty on CPU"
            )
        try:
            check_fp8_settings(
                self.fp8,
                self.fp8_recipe,
                self.fp8_param_gather,
                self.first_last_layers_bf16,
                prefix="model.",
            )
            if self.fp8_param_gather and not use_distributed_optimizer:
                raise ValueError(
                    "model.fp8_param_gather=true needs parallel.use_distributed_optimizer=true"
                )
            check_fp8_available(self.fp8, self.fp8_recipe, key="model.fp8")
        except ValueError as e:
            out.append(str(e))
        return out

    def megatron_overrides(self) -> dict:
        """ModelConfig fields this section sets beyond the HF config (precision recipes)."""
        from megatron_agpo.models.precision import model_overrides

        out = model_overrides(self)
        out.pop("params_dtype")  # passed on its own by the trainer
        return out


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
    """Dynamic batch size: tokens per micro-batch (packed: the sequences' tokens; padded: rows
    x longest row); sequences are taken longest first and packed first-fit, a longer one runs
    alone. 0: micro_batch_size sequences each."""
    packing: bool | None = None
    """true: pack a micro-batch's sequences into one row with exact attention boundaries
    (Transformer Engine's THD layout; megatron's local attention gets a block-diagonal causal
    mask), so no padding is computed. false: one padded row per sequence. null (auto): packed
    where the attention is Transformer Engine's (its cost stays per sequence), padded with
    megatron's local attention (CPU), which would compute the packed row's whole T x T
    scores (measured 2x slower there, docs/PERFORMANCE.md). Either way only response tokens
    reach the output layer and the loss."""
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
    """Stop the run after this many optimizer updates in a row were skipped because a gradient
    held inf/NaN on some rank (a finite update resets the count)."""
    eval_every: int = 20
    """Evaluate pass@k on held-out prompts before the first step and every this many steps
    (0: never). The last step is evaluated only when the run's steps are a multiple of it."""
    eval_n: int = 16
    """Samples per held-out prompt for pass@k (k = 1, 2, 4, ... eval_n)."""
    seed: int = 1234
    """Seed of the sampling: each request's vLLM seed derives from it, the step, the dynamic
    sampling round and the prompt. (Model init uses parallel.seed, prompt order data.seed.)"""


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
    """Complete checkpoints kept (0: all); older ones are deleted only after a new one is
    complete."""
    save_final: bool = True
    """Save at the end of the run (when the last step was not saved already)."""
    resume_fallback: bool = False
    """With resume=auto: when the latest checkpoint fails its integrity check, resume from
    the newest older one that passes (logged as a warning) instead of stopping."""
    save_before_end_s: float = 120.0
    """Seconds before the job's end (SLURM_JOB_END_TIME, or end_time) at which the run saves
    and exits with 75, on top of the last step's duration; no effect without an end time."""
    end_time: float | None = None
    """The job's end in epoch seconds, when no SLURM_JOB_END_TIME says it (None: none)."""
    save_on_failure: bool = True
    """When the rollout engine fails (a replica died, its heartbeat stopped, the pool is
    unusable): every rank stops, saves the last completed step (unless already saved) and the
    run exits 69 with one line naming the failure, the checkpoint and how to resume (the same
    command resumes it exactly). false: exit 69 without saving."""


@dataclass
class LoggingSection:
    """What the run leaves behind."""

    run_dir: str = "runs/default"
    """Everything goes here: config.json, metrics.jsonl, curves.png, checkpoints/,
    replica_logs/, tensorboard/ (docs/TRAINING.md lists what each holds)."""
    tensorboard: bool = True
    """Also write TensorBoard events (when tensorboard is installed)."""
    progress: bool = True
    """Console progress bar."""
    verbosity: str = "info"
    """quiet, info or debug. info: megatron-core's known apex / Transformer Engine fallback
    warnings are summarised in one line on rank 0, ranks > 0 print only errors, vLLM logs
    warnings and errors. quiet: also vLLM errors only. debug: everything, on every rank."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; `pip install wandb`)."""
    wandb_project: str = "megatron-agpo"
    """W&B project."""
    wandb_mode: str = "auto"
    """online, offline (files under run_dir/wandb, `wandb sync` them later) or auto (online
    when a W&B API key is configured and the W&B host answers, else offline)."""
    existing: str = "refuse"
    """When a run starts at step 0 (checkpoint.resume=none, or nothing to resume) in a run_dir
    holding an earlier run's metrics.jsonl lines or checkpoints: refuse (exit 2), archive
    (move them to run_dir/archive/<time>/) or overwrite (delete them)."""

    def __post_init__(self) -> None:
        if self.existing not in ("refuse", "archive", "overwrite"):
            raise ValueError(
                f"LoggingSection.existing must be refuse, archive or overwrite, got "
                f"{self.existing!r}"
            )


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
        """Raise `ConfigError` listing every problem of `problems()` (one line each)."""
        found = self.problems()
        if found:
            raise ConfigError(found)

    def problems(self) -> list[str]:
        """Every range, choice and cross-section problem, one line each, naming the key.

        Pure (no files, no network): `megatron_agpo.validate.preflight` adds the checks that
        read paths (model folder, data file)."""
        out: list[str] = []

        def need(ok: bool, key: str, value, rule: str) -> None:
            if not ok:
                out.append(f"{key}={value!r}: {rule}")

        d, r, t, s = self.data, self.rollout, self.trainer, self.scheduler
        try:
            adv = self.algorithm.advantage_config()
        except ValueError as e:  # an unknown preset or rule
            out.append(f"algorithm: {e}")
            adv = None
        need(r.mode in ("replicas", "colocated"), "rollout.mode", r.mode, "replicas or colocated")
        need(
            t.old_logp in ("recompute", "rollout"),
            "trainer.old_logp",
            t.old_logp,
            "recompute or rollout",
        )
        need(
            d.kind in ("arithmetic", "math_jsonl", "relevance"),
            "data.kind",
            d.kind,
            "arithmetic, math_jsonl or relevance",
        )
        if d.kind == "math_jsonl" and not d.path:
            out.append("data.path is empty: data.kind=math_jsonl needs data.path=FILE")
        need(d.format in ("problem", "verl"), "data.format", d.format, "problem or verl")
        need(d.prompts_per_step >= 1, "data.prompts_per_step", d.prompts_per_step, "must be >= 1")
        need(
            d.max_prompt_tokens >= 1, "data.max_prompt_tokens", d.max_prompt_tokens, "must be >= 1"
        )
        need(d.num_eval >= 0, "data.num_eval", d.num_eval, "must be >= 0")
        if d.kind == "arithmetic":
            need(d.num_train >= 1, "data.num_train", d.num_train, "must be >= 1")
        need(r.n >= 1, "rollout.n", r.n, "must be >= 1")
        if adv is not None and r.n < 2 and "group" in (adv.pos_rule, adv.neg_rule):
            out.append(f"rollout.n={r.n}: a group advantage ({self.algorithm.name}) needs n >= 2")
        need(r.temperature >= 0, "rollout.temperature", r.temperature, "must be >= 0")
        need(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
        need(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
        if r.max_new_tokens >= r.engine.max_model_len:
            out.append(
                f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in "
                f"rollout.engine.max_model_len={r.engine.max_model_len}"
            )
        for key in (
            "steps",
            "micro_batch_size",
            "ppo_epochs",
            "mini_batches",
            "eval_n",
            "max_sampling_rounds",
            "max_skipped_steps",
        ):
            need(getattr(t, key) >= 1, f"trainer.{key}", getattr(t, key), "must be >= 1")
        need(t.eval_every >= 0, "trainer.eval_every", t.eval_every, "must be >= 0 (0: never)")
        need(t.token_budget >= 0, "trainer.token_budget", t.token_budget, "must be >= 0")
        total = d.prompts_per_step * r.n
        if t.mini_batches >= 1 and total >= 1 and total % t.mini_batches:
            out.append(
                f"{total} sequences per step (data.prompts_per_step x rollout.n) do not split "
                f"into trainer.mini_batches={t.mini_batches}"
            )
        need(
            t.dynamic_sampling in ("off", "zero_advantage", "identical_rewards"),
            "trainer.dynamic_sampling",
            t.dynamic_sampling,
            "off, zero_advantage or identical_rewards",
        )
        need(
            s.decay_style in ("constant", "linear", "cosine"),
            "scheduler.decay_style",
            s.decay_style,
            "constant, linear or cosine",
        )
        need(s.warmup_steps >= 0, "scheduler.warmup_steps", s.warmup_steps, "must be >= 0")
        need(s.decay_steps >= 0, "scheduler.decay_steps", s.decay_steps, "must be >= 0")
        need(self.optimizer.lr > 0, "optimizer.lr", self.optimizer.lr, "must be > 0")
        need(
            0 <= s.min_lr <= self.optimizer.lr,
            "scheduler.min_lr",
            s.min_lr,
            f"must be in [0, optimizer.lr={self.optimizer.lr}]",
        )
        # Only meaningful once the run's length is valid (trainer.steps=0 is reported above).
        run_ok = min(t.steps, t.ppo_epochs, t.mini_batches) >= 1
        if run_ok and 1 <= s.warmup_steps >= self.total_updates():
            out.append(
                f"scheduler.warmup_steps={s.warmup_steps} must be below the run's "
                f"{self.total_updates()} optimizer updates (scheduler.decay_steps, else "
                "trainer.steps x ppo_epochs x mini_batches)"
            )
        need(
            self.checkpoint.save_every >= 0,
            "checkpoint.save_every",
            self.checkpoint.save_every,
            "must be >= 0 (0: only at the end)",
        )
        need(
            self.checkpoint.keep_last >= 1,
            "checkpoint.keep_last",
            self.checkpoint.keep_last,
            "must be >= 1",
        )
        need(
            isinstance(self.checkpoint.save_on_failure, bool),
            "checkpoint.save_on_failure",
            self.checkpoint.save_on_failure,
            "must be true or false",
        )
        need(
            self.logging.verbosity in ("quiet", "info", "debug"),
            "logging.verbosity",
            self.logging.verbosity,
            "quiet, info or debug",
        )
        need(
            self.logging.wandb_mode in ("auto", "online", "offline"),
            "logging.wandb_mode",
            self.logging.wandb_mode,
            "auto, online or offline",
        )
        need(
            self.model.params_dtype in ("float32", "bfloat16"),
            "model.params_dtype",
            self.model.params_dtype,
            "float32 or bfloat16",
        )
        p = self.parallel
        need(p.tensor_parallel >= 1, "parallel.tensor_parallel", p.tensor_parallel, "must be >= 1")
        need(
            p.pipeline_parallel >= 1,
            "parallel.pipeline_parallel",
            p.pipeline_parallel,
            "must be >= 1",
        )
        need(self.nproc >= 1, "nproc", self.nproc, "must be >= 1")
        if p.sequence_parallel and p.tensor_parallel == 1:
            out.append("parallel.sequence_parallel=True needs parallel.tensor_parallel > 1")
        if not self.model.hf_path and p.tensor_parallel >= 1 and p.pipeline_parallel >= 1:
            out.extend(self._tiny_model_problems())
        out.extend(
            self.model.precision_problems(p.use_distributed_optimizer, r.engine.quantization)
        )
        from megatron_agpo.rewards.registry import reward_names

        need(self.reward.name in reward_names(), "reward.name", self.reward.name,
             "one of " + ", ".join(reward_names()))  # fmt: skip
        return out

    def _tiny_model_problems(self) -> list[str]:
        """The tiny model's shape against the parallel layout (an HF model's is checked
        against its config.json in `megatron_agpo.validate`)."""
        m, tp, pp = self.model, self.parallel.tensor_parallel, self.parallel.pipeline_parallel
        out = []
        for key, size in (
            ("tiny_hidden", m.tiny_hidden),
            ("tiny_layers", m.tiny_layers),
            ("tiny_heads", m.tiny_heads),
            ("tiny_ffn", m.tiny_ffn),
        ):
            if size < 1:
                out.append(f"model.{key}={size}: must be >= 1")
        if out:
            return out
        kv = max(1, m.tiny_heads // 2)
        if m.tiny_hidden % m.tiny_heads:
            out.append(
                f"model.tiny_hidden={m.tiny_hidden} is not divisible by model.tiny_heads="
                f"{m.tiny_heads}"
            )
        if m.tiny_heads % tp or kv % tp:
            out.append(
                f"parallel.tensor_parallel={tp} does not divide the tiny model's "
                f"{m.tiny_heads} attention heads and {kv} KV heads (model.tiny_heads)"
            )
        if m.tiny_ffn % tp:
            out.append(f"parallel.tensor_parallel={tp} does not divide model.tiny_ffn={m.tiny_ffn}")
        if m.tiny_layers % pp:
            out.append(
                f"parallel.pipeline_parallel={pp} does not divide model.tiny_layers={m.tiny_layers}"
            )
        if self.rollout.engine.max_model_len > m.tiny_max_len:
            out.append(
                f"rollout.engine.max_model_len={self.rollout.engine.max_model_len} exceeds the "
                f"tiny model's context model.tiny_max_len={m.tiny_max_len}"
            )
        return out

    def total_updates(self) -> int:
        """Optimizer updates the schedule spans."""
        t = self.trainer
        return self.scheduler.decay_steps or t.steps * t.ppo_epochs * t.mini_batches


class ConfigError(ValueError):
    """One or more configuration problems; `problems` holds one line per problem, each
    naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def register_configs() -> None:
    """Register TrainConfig as Hydra's schema for conf/train.yaml."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
