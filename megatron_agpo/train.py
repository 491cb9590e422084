"""`agpo-train` / `python -m megatron_agpo.train`: the AGPO trainer's entry point.

    agpo-train                                   # the CPU default: tiny Llama, TP=2, vLLM
    agpo-train algorithm=grpo trainer.steps=100  # Hydra overrides
    agpo-train --help                            # config groups, most used keys
    agpo-train model=smollm2_135m --cfg job      # the composed config, resolved
    agpo-train -m algorithm=grpo,agpo trainer.seed=0,1,2   # one run after another
    torchrun --nproc_per_node 8 -m megatron_agpo.train model=qwen2_5_math_1_5b ...
    srun python -m megatron_agpo.train ...       # SLURM: one task per GPU

Outside torchrun/srun it starts `nproc` processes itself (torch.distributed.run), after the
whole configuration has been checked (`megatron_agpo.validate.preflight`): a bad key, value,
path or data file is reported as one line per problem, exit code 2, before any rank starts.
`--debug` (or AGPO_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass, field

from megatron_agpo.trainer.compose import (
    PROG,
    UsageError,
    _schema,
    check_overrides,
    config_groups,
    config_yaml,
    default_options,
    iter_keys,
    load_config,
)

# Set in the environment of the processes this launcher starts: they skip the checks it ran.
_CHECKED_ENV = "AGPO_PREFLIGHT_DONE"

# The keys `--help` shows (every key: `--help-all`).
MOST_USED = (
    "trainer.steps",
    "data.prompts_per_step",
    "rollout.n",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "optimizer.lr",
    "trainer.micro_batch_size",
    "trainer.eval_every",
    "model.hf_path",
    "data.path",
    "parallel.tensor_parallel",
    "nproc",
    "trainer.seed",
    "checkpoint.resume",
    "logging.run_dir",
    "logging.verbosity",
    "logging.wandb",
)


@dataclass
class CliOptions:
    """What the command line asks for besides the Hydra overrides."""

    help: bool = False
    help_all: bool = False
    cfg: str | None = None
    multirun: bool = False
    debug: bool = False
    overrides: list[str] = field(default_factory=list)


def parse_cli(argv: list[str]) -> CliOptions:
    """Split argv into our flags (Hydra's spelling) and key=value overrides."""
    opts = CliOptions()
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            opts.help = True
        elif arg == "--help-all":
            opts.help = opts.help_all = True
        elif arg in ("-c", "--cfg") or arg.startswith("--cfg="):
            value = arg.partition("=")[2] if "=" in arg else next(it, None)
            if value not in ("job", "all"):
                raise UsageError(
                    f"--cfg {value or ''}".strip() + ": expected `--cfg job` (the composed run "
                    "config; `all` is the same: there is no separate Hydra job config)"
                )
            opts.cfg = value
        elif arg in ("--resolve",):
            pass  # --cfg job always prints the resolved config
        elif arg in ("-m", "--multirun"):
            opts.multirun = True
        elif arg == "--debug":
            opts.debug = True
        elif arg.startswith("-") and "=" not in arg:
            raise UsageError(
                f"unknown option {arg!r}: agpo-train takes key=value overrides and --help, "
                "--help-all, --cfg job, -m, --debug"
            )
        else:
            opts.overrides.append(arg)
    return opts


# ------------------------------------------------------------------ help


def _lookup(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def help_text(overrides: list[str], all_keys: bool = False) -> str:
    """`--help`: usage, config groups and their options, the most used keys (`--help-all`:
    every key) with their values under `overrides` and their docstrings."""
    try:
        cfg = load_config(overrides, validate=False)
        note = f" under {' '.join(overrides)}" if overrides else ""
    except UsageError as e:
        cfg, note = _schema()(), f" (defaults: {e.problems[0]})"
    groups, defaults = config_groups(), default_options()
    chosen = dict(defaults)
    for o in overrides:
        k, sep, v = o.partition("=")
        if sep and k in groups:
            chosen[k] = v
    lines = [
        f"usage: {PROG} [KEY=VALUE | GROUP=OPTION ...] [--help | --help-all | --cfg job | -m] "
        "[--debug]",
        "",
        "AGPO RL post-training on megatron-core with vLLM rollouts. Arguments are Hydra",
        "overrides of conf/train.yaml; everything is checked before any process starts.",
        "",
        "Config groups (GROUP=OPTION; [chosen]):",
    ]
    for g, opts in groups.items():
        shown = ", ".join(f"[{o}]" if o == chosen.get(g) else o for o in opts)
        lines.append(f"  {g:<10} {shown}")
    lines += ["", f"{'All' if all_keys else 'Most used'} keys (value{note}):"]
    keys = [k for k, _ in iter_keys()] if all_keys else list(MOST_USED)
    docs = dict(iter_keys())
    for k in keys:
        value = _lookup(cfg, k)
        doc = docs.get(k, "")
        if not all_keys and len(doc) > 72:
            doc = doc[:69].rsplit(" ", 1)[0] + " ..."
        lines.append(f"  {k}={value!r}" if not doc else f"  {k}={value!r}\n      {doc}")
    lines += [
        "",
        "Flags:",
        "  -h, --help       this text (after overrides: their values)",
        "  --help-all       every key with its description",
        "  --cfg job        print the composed, resolved configuration (YAML) and exit",
        "  -m, --multirun   run every combination of comma-separated values, one after",
        "                   another, each in logging.run_dir/multirun-<i>",
        "  --debug          full Python tracebacks (also AGPO_DEBUG=1)",
        "",
        "Examples:",
        f"  {PROG} algorithm=grpo trainer.steps=100",
        f"  {PROG} model=smollm2_135m data=math_jsonl data.path=train.jsonl",
        f"  {PROG} -m algorithm=grpo,agpo trainer.seed=0,1,2",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ launching


def _under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _launch(cmd: list[str], env: dict[str, str]) -> int:
    """Run a child command to completion; its exit code. The one place processes start."""
    return subprocess.call(cmd, env=env)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a multirun: the cartesian product of the sweeps, in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for o, text in zip(OverridesParser.create().parse_overrides(overrides), overrides, strict=True):
        if o.is_sweep_override():
            prefix = text.partition("=")[0]
            choices.append([f"{prefix}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(c) for c in itertools.product(*choices)]


def _is_sweep(overrides: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides))


def multirun(overrides: list[str], debug: bool) -> int:
    """Every combination, checked first (all of them, before any starts), then run one
    after another; stops at the first failure."""
    from megatron_agpo.validate import preflight

    jobs = sweep_jobs(overrides)
    swept_dir = any(o.startswith("logging.run_dir=") for o in overrides if "," in o)
    planned = []
    for i, job in enumerate(jobs):
        cfg = load_config(job, validate=False)
        if not swept_dir:
            job = [*job, f"logging.run_dir={cfg.logging.run_dir}/multirun-{i}"]
            cfg.logging.run_dir = f"{cfg.logging.run_dir}/multirun-{i}"
        problems = preflight(cfg, cfg.nproc)
        if problems:
            raise UsageError(*(f"job {i} ({' '.join(job)}): {p}" for p in problems))
        planned.append((job, cfg.logging.run_dir))
    for i, (job, run_dir) in enumerate(planned):
        print(f"[{PROG}] multirun job {i + 1}/{len(planned)}: {' '.join(job)} -> {run_dir}")
        env = dict(os.environ, **({"AGPO_DEBUG": "1"} if debug else {}))
        rc = _launch([sys.executable, "-m", "megatron_agpo.train", *job], env)
        if rc:
            print(f"[{PROG}] multirun job {i + 1} failed (exit code {rc}); stopping")
            return rc
    return 0


def _fail(e: UsageError, under: bool) -> int:
    if not under or _rank() == 0:
        for p in e.problems:
            print(f"{PROG}: error: {p}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program (not a caller in-process): signals count from now on
        from megatron_agpo.early_signals import catch_early

        catch_early()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("AGPO_DEBUG", "") not in ("", "0")
    under = _under_launcher()
    try:
        opts = parse_cli(argv)
        if opts.help:
            print(help_text(opts.overrides, all_keys=opts.help_all))
            return 0
        if opts.multirun:
            import signal

            for sig in (signal.SIGTERM, signal.SIGUSR1):  # this process trains nothing itself
                signal.signal(sig, signal.SIG_DFL)
            if under:
                raise UsageError("-m (multirun) starts the runs itself: not under torchrun/srun")
            problems = check_overrides(opts.overrides)
            if problems:
                raise UsageError(*problems)
            return multirun(opts.overrides, debug)
        problems = check_overrides(opts.overrides)
        if problems:
            raise UsageError(*problems)
        if _is_sweep(opts.overrides):
            raise UsageError(
                "comma-separated values sweep several runs: add -m to run each combination"
            )
        cfg = load_config(opts.overrides, validate=False)
        if opts.cfg:
            print(config_yaml(cfg), end="")
            return 0
        if os.environ.get(_CHECKED_ENV) != "1":
            from megatron_agpo.validate import preflight

            world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
            problems = preflight(cfg, world if under else cfg.nproc)
            if problems:
                raise UsageError(*problems)
    except UsageError as e:
        if debug:
            raise
        return _fail(e, under)
    from megatron_agpo.backends import configure_logging

    # A launcher that starts ranks stays quiet too (its warm start imports megatron), but the
    # summary line is rank 0's to print, once.
    starts_ranks = not under and cfg.nproc > 1
    configure_logging(
        cfg.logging.verbosity,
        _rank() if under else 0,
        log=(lambda _line: None) if starts_ranks else print,
    )
    return run(cfg, opts.overrides)


def run(cfg, overrides: list[str]) -> int:
    """Start the ranks (outside torchrun/srun, nproc > 1) or train in this process."""
    if not _under_launcher() and cfg.nproc > 1:
        # Build (and warm-start) the policy once, here, before the ranks start.
        from megatron_agpo.trainer.loop import ensure_policy_dir

        ensure_policy_dir(cfg)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={cfg.nproc}",
            "-m",
            "megatron_agpo.train",
            *overrides,
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env[_CHECKED_ENV] = "1"
        from megatron_agpo.launcher import run_ranks  # signals to the ranks; no orphans

        return run_ranks(cmd, env)
    from megatron_agpo.models.checkpoint import CheckpointError
    from megatron_agpo.rewards.base import RewardUnavailable
    from megatron_agpo.trainer.loop import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.run()
    except (RewardUnavailable, CheckpointError) as e:  # a failing verifier, a full disk
        if _rank() == 0:
            print(f"agpo-train: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    from megatron_agpo.launcher import leave

    leave(main())
