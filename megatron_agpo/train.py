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

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import os
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROG = "agpo-train"
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


class UsageError(ValueError):
    """A bad command line or configuration: printed as `agpo-train: error: <line>` per
    problem, exit code 2."""

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


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


# ------------------------------------------------------------------ schema and docs


def _schema():
    from megatron_agpo.trainer.config import TrainConfig

    return TrainConfig


@functools.cache
def _field_types(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings (the string after each field) of a dataclass."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, SyntaxError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _child(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls`, None for a leaf."""
    t = _field_types(cls).get(name)
    return t if dataclasses.is_dataclass(t) else None


def iter_keys(cls: type | None = None, prefix: str = ""):
    """(dotted key, docstring) of every leaf setting, in declaration order."""
    cls = cls or _schema()
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        sub = _child(cls, f.name)
        if sub is not None:
            yield from iter_keys(sub, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", docs.get(f.name, "")


def key_problem(key: str) -> str | None:
    """Why `key` (dotted) is not a setting of the schema; None when it is."""
    cls, parts = _schema(), key.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            hint = (
                f"did you mean {' or '.join('.'.join([*parts[:i], c]) for c in close)}?"
                if close
                else f"{where} has: {', '.join(names)}"
            )
            return f"{key}: no such key ({hint}); `{PROG} --help-all` lists every key"
        sub = _child(cls, part)
        if sub is None:
            if i < len(parts) - 1:
                return f"{key}: {'.'.join(parts[: i + 1])} is a value, not a section"
            return None
        cls = sub
    if len(parts) and cls is not _schema():
        return None  # a whole section (`rollout.engine={...}`): Hydra checks its fields
    return None


def config_groups() -> dict[str, list[str]]:
    """conf/ group -> its options (file names without .yaml)."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONF_DIR.iterdir())
        if d.is_dir()
    }


def default_options() -> dict[str, str]:
    """The option each group has in conf/train.yaml's defaults list."""
    import yaml

    defaults = yaml.safe_load((CONF_DIR / "train.yaml").read_text()).get("defaults", [])
    return {k: v for item in defaults if isinstance(item, dict) for k, v in item.items()}


def check_overrides(overrides: list[str]) -> list[str]:
    """Each override against the schema and conf/ before Hydra sees it: unknown keys (also
    with `+`, which Hydra would add and the dataclass silently drop), unknown group options,
    syntax errors. Returns the problems; sweeps are checked value by value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    groups = config_groups()
    out: list[str] = []
    parser = OverridesParser.create()
    for text in overrides:
        try:
            (o,) = parser.parse_overrides([text])
        except OverrideParseException as e:
            msg = " ".join(str(e).split("\n")[0].split())
            out.append(f"{text!r}: not a Hydra override ({msg}); write key=value")
            continue
        key = o.key_or_group
        if key in groups:
            if o.is_delete():
                out.append(f"~{key}: config group {key} cannot be removed")
                continue
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for v in values:
                if str(v) not in groups[key]:
                    out.append(
                        f"{key}={v}: no such option; {key} is one of {', '.join(groups[key])}"
                    )
            continue
        if key == "hydra" or key.startswith("hydra."):
            out.append(
                f"{key}: Hydra's own settings are not used ({PROG} composes the config "
                "itself); outputs go to logging.run_dir"
            )
            continue
        problem = key_problem(key)
        if problem:
            out.append(problem)
        elif o.is_add():
            out.append(f"+{key}: the key exists; set it without '+' ({key}=...)")
        elif o.is_delete():
            out.append(f"~{key}: settings cannot be removed; set a value instead")
    return out


# ------------------------------------------------------------------ composition


def compose(overrides: list[str]):
    """conf/train.yaml composed with `overrides` (an OmegaConf DictConfig); Hydra's errors
    become one-line `UsageError`s naming the key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megatron_agpo.trainer.config import register_configs

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError(_hydra_message(e)) from e


def _hydra_message(e: BaseException) -> str:
    """One line from a Hydra / OmegaConf error: the key and what went wrong."""
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    msg = getattr(cause, "msg", None) or str(cause)
    first = " ".join(msg.strip().split("\n")[0].split())
    if "could not be converted to" in first:
        want = first.rsplit(" ", 1)[-1].lower().rstrip(".")
        value = first.split("'")[1] if "'" in first else "?"
        return f"{key}={value}: expected {'an' if want[0] in 'aeiou' else 'a'} {want}"
    return f"{key}: {first}" if key else first


# Sections that validate themselves in __post_init__ name their class in messages.
_SECTION_KEYS = {"RolloutConfig.": "rollout.engine.", "RewardConfig.": "reward.math."}


def load_config(overrides: list[str], validate: bool = True):
    """conf/train.yaml composed with Hydra overrides, as a TrainConfig (validated unless
    validate=False; the checks that read files are `megatron_agpo.validate.preflight`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    problems = check_overrides(overrides)
    if problems:
        raise UsageError(*problems)
    composed = compose(overrides)
    try:
        cfg = OmegaConf.to_object(composed)
    except OmegaConfBaseException as e:
        raise UsageError(_hydra_message(e)) from e
    except ValueError as e:  # a section's __post_init__ names its class: give the key
        msg = " ".join(str(e).split())
        for cls_name, key in _SECTION_KEYS.items():
            msg = msg.replace(cls_name, key)
        raise UsageError(msg) from e
    if validate:
        cfg.validate()
    return cfg


def config_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


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
    sys.exit(main())
