"""The run's configuration: one dataclass per component, composed into `TrainConfig`.

Each component owns its settings' dataclass, in its own module (`PolicyLossConfig`,
`ParallelConfig`, `OptimizerSettings`, `RolloutConfig`, the rewards' and data sources' configs,
registered beside them in `megatron_agpo.registry`); the loop's own sections are here.
`TrainConfig` only composes them and adds the checks that span sections. Every section reports
its problems with `problems(prefix)` (one line each naming the full key); `__post_init__` only
coerces. `conf/*.yaml` only selects and overrides; `schema()` (with the settings of rewards
registered by the run's `imports`) is what Hydra composes it into
(`megatron_agpo.trainer.compose`), so unknown keys fail.
The cluster a run is planned for is not here: it is the planner's (`megatron_agpo.plan`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from megatron_agpo.algorithms import AdvantageConfig, PolicyLossConfig, resolve
from megatron_agpo.data.loaders import ROW_FORMATS, PromptEncoding
from megatron_agpo.data.relevance import RelevanceDataConfig
from megatron_agpo.data.tasks import DATA_SOURCES
from megatron_agpo.parallel import OptimizerSettings, ParallelConfig
from megatron_agpo.registry import config_problems, need
from megatron_agpo.rewards.math import RewardConfig
from megatron_agpo.rewards.registry import REWARDS
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

    def problems(self, prefix: str) -> list[str]:
        try:
            self.advantage_config()
        except ValueError as e:  # an unknown preset, or a rule (the overrides are ours)
            msg = str(e)
            if "AdvantageConfig." in msg:
                return [msg.replace("AdvantageConfig.", prefix)]
            return [f"{prefix}name={self.name!r}: {msg}"]
        return []

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
    router_replay: str = "off"
    """Mixture-of-experts policies: `rollout` makes the trainer's forwards (old log-probs and
    the update) send each token to the experts the rollout engine sent it to (vLLM's
    routed experts, replayed through megatron's RouterReplay; the routing weights still come
    from the trainer's router, which keeps its gradient); `off` lets the trainer's router
    choose. Refused on a dense model (docs/MODELS.md)."""
    moe_aux_loss_coeff: float = 0.0
    """Mixture-of-experts policies: weight of megatron's load-balancing loss added to the
    policy loss through the routers (0: off); its value is logged as
    `moe/load_balancing_loss`. Ignored by a dense model."""

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        need(out, self.params_dtype in ("float32", "bfloat16"), f"{prefix}params_dtype",
             self.params_dtype, "float32 or bfloat16")  # fmt: skip
        need(out, self.router_replay in ("off", "rollout"), f"{prefix}router_replay",
             self.router_replay, "off or rollout")  # fmt: skip
        need(out, self.moe_aux_loss_coeff >= 0, f"{prefix}moe_aux_loss_coeff",
             self.moe_aux_loss_coeff, "must be >= 0")  # fmt: skip
        return out

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
        if self.moe_aux_loss_coeff:  # MoE only; ModelConfig's default is off
            out["moe_aux_loss_coeff"] = float(self.moe_aux_loss_coeff)
        return out


@dataclass
class DataSection:
    """Prompts: the synthetic arithmetic task, a MATH-style / verl file, or relevance pairs
    (each a registered source, `data.kind`), and how they become token ids (`prompt`,
    `max_prompt_tokens`). The one owner of these settings: `megatron_agpo.data` takes them
    as arguments."""

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
    """Longer prompts (after the chat template) are filtered out and counted, never truncated;
    the engine's context minus rollout.max_new_tokens may lower the limit further."""
    prompt: PromptEncoding = field(default_factory=PromptEncoding)
    """How a file's rows become chats (field names, system prompt, instruction) and chats
    token ids (the chat template) (megatron_agpo.data.loaders)."""
    seed: int = 0
    """Generator and shuffle seed."""
    relevance: RelevanceDataConfig = field(default_factory=RelevanceDataConfig)
    """data.kind=relevance: pairs, label set and prompt template (megatron_agpo.data.relevance)."""

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        kinds = DATA_SOURCES.names()
        need(out, self.kind in kinds, f"{prefix}kind", self.kind, "one of " + ", ".join(kinds))
        if self.kind == "math_jsonl" and not self.path:
            out.append(f"{prefix}path is empty: {prefix}kind=math_jsonl needs {prefix}path=FILE")
        need(out, self.format in ROW_FORMATS, f"{prefix}format", self.format,
             " or ".join(ROW_FORMATS))  # fmt: skip
        for key in ("prompts_per_step", "max_prompt_tokens"):
            need(out, getattr(self, key) >= 1, prefix + key, getattr(self, key), "must be >= 1")
        need(out, self.num_eval >= 0, f"{prefix}num_eval", self.num_eval, "must be >= 0")
        if self.kind == "arithmetic":
            need(out, self.num_train >= 1, f"{prefix}num_train", self.num_train, "must be >= 1")
        return out


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
    partial: str = "finish"
    """With overlap (trainer.max_staleness > 0): what a weight update does to the responses
    the replicas are generating. finish: they end under the weights they started with (the
    sync waits for them; one-step-off). resume: the replicas pause between two engine steps,
    load the new weights and continue every unfinished response from its partial tokens; each
    token keeps the version and log-prob of the weights that sampled it. Replicas only."""

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        need(out, self.mode in ("replicas", "colocated"), f"{prefix}mode", self.mode,
             "replicas or colocated")  # fmt: skip
        need(out, self.n >= 1, f"{prefix}n", self.n, "must be >= 1")
        need(out, self.partial in ("finish", "resume"), f"{prefix}partial", self.partial,
             "finish or resume")  # fmt: skip
        need(out, self.temperature >= 0, f"{prefix}temperature", self.temperature, "must be >= 0")
        need(out, 0 < self.top_p <= 1, f"{prefix}top_p", self.top_p, "must be in (0, 1]")
        need(out, self.max_new_tokens >= 1, f"{prefix}max_new_tokens", self.max_new_tokens,
             "must be >= 1")  # fmt: skip
        if self.max_new_tokens >= self.engine.max_model_len:
            out.append(
                f"{prefix}max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                f"{prefix}engine.max_model_len={self.engine.max_model_len}"
            )
        return out


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
    max_staleness: int = 0
    """Generation overlapping training: the replicas sample the next batches while the trainer
    updates, and a sample is trained on while the weights that sampled its oldest token are
    at most this many versions behind the trainer's (older ones are dropped and counted,
    never trained on). 0: synchronous, sample then train (the default). Needs
    rollout.mode=replicas; the loss corrects with the behaviour importance weight
    (algorithm.loss.tis_mode, docs/ALGORITHM.md)."""
    background_sync: bool | None = None
    """With overlap: the weight sync after an update runs in a thread of its own, beside the
    next step's reward, log-probs and first forward and backward passes, and is joined
    before the next optimizer step changes the weights (the gather over process groups of
    its own; the next step's batch is collected before the sync starts). null (auto): on
    where it can be, trainer.max_staleness >= 1 with rollout.partial=finish; false: the sync
    blocks the end of the step. (Synchronous runs and rollout.partial=resume need the new
    weights for the next step's samples, so the sync cannot move beside it.)"""

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        for key in ("steps", "micro_batch_size", "ppo_epochs", "mini_batches", "eval_n",
                    "max_sampling_rounds", "max_skipped_steps"):  # fmt: skip
            need(out, getattr(self, key) >= 1, prefix + key, getattr(self, key), "must be >= 1")
        need(out, self.eval_every >= 0, f"{prefix}eval_every", self.eval_every,
             "must be >= 0 (0: never)")  # fmt: skip
        need(out, self.token_budget >= 0, f"{prefix}token_budget", self.token_budget,
             "must be >= 0")  # fmt: skip
        need(out, self.max_staleness >= 0, f"{prefix}max_staleness", self.max_staleness,
             "must be >= 0 (0: synchronous)")  # fmt: skip
        need(out, self.old_logp in ("recompute", "rollout"), f"{prefix}old_logp", self.old_logp,
             "recompute or rollout")  # fmt: skip
        need(out, self.dynamic_sampling in ("off", "zero_advantage", "identical_rewards"),
             f"{prefix}dynamic_sampling", self.dynamic_sampling,
             "off, zero_advantage or identical_rewards")  # fmt: skip
        return out


def background_sync_on(trainer: TrainerSection, rollout: RolloutSection) -> bool:
    """trainer.background_sync, or (null) on exactly where it can be: overlapped generation
    with rollout.partial=finish."""
    if trainer.background_sync is not None:
        return bool(trainer.background_sync)
    return trainer.max_staleness > 0 and rollout.partial == "finish"


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

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        need(out, self.decay_style in ("constant", "linear", "cosine"), f"{prefix}decay_style",
             self.decay_style, "constant, linear or cosine")  # fmt: skip
        need(out, self.warmup_steps >= 0, f"{prefix}warmup_steps", self.warmup_steps,
             "must be >= 0")  # fmt: skip
        need(out, self.decay_steps >= 0, f"{prefix}decay_steps", self.decay_steps, "must be >= 0")
        return out


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

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        need(out, self.save_every >= 0, f"{prefix}save_every", self.save_every,
             "must be >= 0 (0: only at the end)")  # fmt: skip
        need(out, self.keep_last >= 1, f"{prefix}keep_last", self.keep_last, "must be >= 1")
        need(out, isinstance(self.save_on_failure, bool), f"{prefix}save_on_failure",
             self.save_on_failure, "must be true or false")  # fmt: skip
        need(out, self.save_before_end_s >= 0, f"{prefix}save_before_end_s",
             self.save_before_end_s, "must be >= 0")  # fmt: skip
        return out


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

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        need(out, self.verbosity in ("quiet", "info", "debug"), f"{prefix}verbosity",
             self.verbosity, "quiet, info or debug")  # fmt: skip
        need(out, self.wandb_mode in ("auto", "online", "offline"), f"{prefix}wandb_mode",
             self.wandb_mode, "auto, online or offline")  # fmt: skip
        need(out, self.existing in ("refuse", "archive", "overwrite"), f"{prefix}existing",
             self.existing, "refuse, archive or overwrite")  # fmt: skip
        return out


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

    def problems(self, prefix: str) -> list[str]:
        out: list[str] = []
        names = REWARDS.names()
        need(out, self.name in names, f"{prefix}name", self.name, "one of " + ", ".join(names))
        return out


def _reward_section(extra: tuple[tuple[str, type], ...]) -> type:
    """RewardSection with a sub-config for each reward registered beyond the built-ins."""
    fields = [(n, c, field(default_factory=c)) for n, c in extra]
    return dataclasses.make_dataclass("RewardSection", fields, bases=(RewardSection,))


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
    nproc: int = 2
    """Processes to start when `agpo-train` runs outside torchrun/srun (CPU default: 2)."""
    imports: list[str] = field(default_factory=list)
    """Python modules imported before the config is composed, e.g. imports=[my_pkg.rewards]:
    they register components (`register_reward(name, config=...)`), whose settings then
    become keys (`reward.<name>.<field>`). Every rank imports them too."""

    def validate(self) -> None:
        """Raise `ConfigError` listing every problem of `problems()` (one line each)."""
        found = self.problems()
        if found:
            raise ConfigError(found)

    def problems(self) -> list[str]:
        """Every problem, one line each naming the key: each section's own (`problems(prefix)`,
        walked by `config_problems`), then the checks that span sections.

        Pure (no files, no network): `megatron_agpo.validate.preflight` adds the checks that
        read paths (model folder, data file)."""
        return config_problems(self) + self.cross_problems()

    def cross_problems(self) -> list[str]:
        """The checks that read more than one section."""
        out: list[str] = []
        d, r, t, s, p = self.data, self.rollout, self.trainer, self.scheduler, self.parallel
        try:
            adv = self.algorithm.advantage_config()
        except ValueError:  # reported by AlgorithmConfig.problems
            adv = None
        if adv is not None and r.n < 2 and "group" in (adv.pos_rule, adv.neg_rule):
            out.append(f"rollout.n={r.n}: a group advantage ({self.algorithm.name}) needs n >= 2")
        total = d.prompts_per_step * r.n
        if t.mini_batches >= 1 and total >= 1 and total % t.mini_batches:
            out.append(
                f"{total} sequences per step (data.prompts_per_step x rollout.n) do not split "
                f"into trainer.mini_batches={t.mini_batches}"
            )
        need(out, 0 <= s.min_lr <= self.optimizer.lr, "scheduler.min_lr", s.min_lr,
             f"must be in [0, optimizer.lr={self.optimizer.lr}]")  # fmt: skip
        # Only meaningful once the run's length is valid (trainer.steps=0 is reported above).
        run_ok = min(t.steps, t.ppo_epochs, t.mini_batches) >= 1
        if run_ok and 1 <= s.warmup_steps >= self.total_updates():
            out.append(
                f"scheduler.warmup_steps={s.warmup_steps} must be below the run's "
                f"{self.total_updates()} optimizer updates (scheduler.decay_steps, else "
                "trainer.steps x ppo_epochs x mini_batches)"
            )
        need(out, self.nproc >= 1, "nproc", self.nproc, "must be >= 1")
        rel_data, rel_reward = self.data.relevance, self.reward.relevance
        if d.kind == "relevance" and self.reward.name == "relevance":
            codes = lambda c: list(c.codes) or list(c.labels)  # noqa: E731 - empty: the names
            if list(rel_data.labels) != list(rel_reward.labels):
                out.append(
                    f"data.relevance.labels={list(rel_data.labels)} and reward.relevance.labels="
                    f"{list(rel_reward.labels)} differ: the reward reads answers against the "
                    "labels the prompts offer"
                )
            elif codes(rel_data) != codes(rel_reward):
                out.append(
                    f"data.relevance.codes={codes(rel_data)} and reward.relevance.codes="
                    f"{codes(rel_reward)} differ"
                )
        if r.mode == "colocated" and t.max_staleness > 0:
            out.append(
                f"trainer.max_staleness={t.max_staleness} needs rollout.mode=replicas: the "
                "colocated engine shares the trainer's devices and cannot overlap (use 0)"
            )
        if r.mode == "colocated" and r.partial == "resume":
            out.append(
                "rollout.partial=resume needs rollout.mode=replicas: the colocated engine "
                "cannot be interrupted by a weight update (use finish)"
            )
        if t.background_sync and t.max_staleness == 0:
            out.append(
                "trainer.background_sync=true needs trainer.max_staleness >= 1: a synchronous "
                "step samples with the weights the sync brings, so it waits for the sync"
            )
        if t.background_sync and r.partial == "resume":
            out.append(
                "trainer.background_sync=true needs rollout.partial=finish: with resume the "
                "next step's batch takes the new weights mid-response, so it waits for the sync"
            )
        if t.max_staleness > 0 and t.old_logp != "recompute":
            out.append(
                f"trainer.max_staleness={t.max_staleness} needs trainer.old_logp=recompute: the "
                "proximal policy is the trainer's recomputed log-probs (docs/ALGORITHM.md)"
            )
        if not self.model.hf_path and p.tensor_parallel >= 1 and p.pipeline_parallel >= 1:
            out.extend(self._tiny_model_problems())
        if not self.model.hf_path:  # an HF model's experts: megatron_agpo.validate
            tiny = "the tiny model (model.hf_path empty) is dense"
            if p.expert_parallel > 1:
                out.append(f"parallel.expert_parallel={p.expert_parallel} needs a "
                           f"mixture-of-experts model; {tiny}")  # fmt: skip
            if self.model.router_replay != "off":
                out.append(f"model.router_replay={self.model.router_replay} needs a "
                           f"mixture-of-experts model; {tiny}")  # fmt: skip
        if self.model.router_replay == "rollout" and r.mode != "colocated":
            # The replicas' wire does not carry Sample.routed_experts yet.
            out.append("model.router_replay=rollout needs rollout.mode=colocated (replica "
                       "engines do not return routes yet)")  # fmt: skip
        out.extend(
            self.model.precision_problems(p.use_distributed_optimizer, r.engine.quantization)
        )
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


def schema() -> type[TrainConfig]:
    """TrainConfig, extended with the settings of every reward registered beyond the built-ins
    (a user's, imported by `imports=`)."""
    own = {f.name for f in dataclasses.fields(RewardSection)}
    extra = tuple((n, c) for n, c in REWARDS.configs().items() if n not in own)
    return _extended(extra) if extra else TrainConfig


@functools.cache
def _extended(extra: tuple[tuple[str, type], ...]) -> type[TrainConfig]:
    section = _reward_section(extra)
    return dataclasses.make_dataclass(
        "TrainConfig",
        [("reward", section, field(default_factory=section))],
        bases=(TrainConfig,),
    )
