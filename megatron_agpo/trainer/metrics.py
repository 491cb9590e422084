"""Metrics: one JSON line per step, TensorBoard when installed, optionally Weights & Biases,
a progress bar, a plot."""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

WANDB_HOST = "https://api.wandb.ai"


@dataclass(frozen=True)
class WandbSettings:
    """What the optional W&B logger needs (from `LoggingSection`: `wandb_settings`)."""

    project: str = "megatron-agpo"
    """W&B project."""
    mode: str = "auto"
    """online, offline or auto (`wandb_mode`)."""
    name: str | None = None
    """Run name shown in W&B (default: the run directory's name)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's configuration, stored with the run."""


def wandb_settings(cfg) -> WandbSettings | None:
    """WandbSettings from a TrainConfig's logging section; None when logging.wandb is off."""
    log = cfg.logging
    if not log.wandb:
        return None
    import dataclasses

    return WandbSettings(
        project=log.wandb_project,
        mode=log.wandb_mode,
        name=Path(log.run_dir).name,
        config=dataclasses.asdict(cfg),
    )


def _settings_from_run_config(path: Path) -> WandbSettings | None:
    """WandbSettings from a run's recorded config (TrainConfig as a dict in JSON); None when
    the file is absent or logging.wandb is off."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    log = config.get("logging") or {}
    if not log.get("wandb"):
        return None
    return WandbSettings(
        project=log.get("wandb_project", "megatron-agpo"),
        mode=log.get("wandb_mode", "auto"),
        name=Path(log.get("run_dir", path.parent)).name,
        config=config,
    )


def _has_api_key(environ) -> bool:
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", WANDB_HOST)).hostname or ""
    try:
        return host in Path(environ.get("NETRC", Path.home() / ".netrc")).read_text()
    except OSError:
        return False


def _host_answers(url: str, timeout_s: float = 2.0) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection(
            (u.hostname or "", u.port or (443 if u.scheme == "https" else 80)), timeout=timeout_s
        ):
            return True
    except OSError:
        return False


def wandb_mode(requested: str, environ=None, probe=_host_answers) -> tuple[str, str]:
    """(mode, why): online or offline for a requested online / offline / auto.

    auto is online only when an API key is configured (WANDB_API_KEY or ~/.netrc) and the
    W&B host (WANDB_BASE_URL) accepts a connection within 2 s; otherwise offline, with the
    run's files kept under run_dir/wandb for a later `wandb sync`. WANDB_MODE, when set,
    wins (W&B's own convention)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"], "WANDB_MODE"
    if requested in ("online", "offline"):
        return requested, "logging.wandb_mode"
    if not _has_api_key(env):
        return "offline", "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    host = env.get("WANDB_BASE_URL", WANDB_HOST)
    if not probe(host):
        return "offline", f"{host} is not reachable"
    return "online", "API key and host reachable"


class WandbLogger:
    """One W&B run in run_dir/wandb; resumed (same id) when the run directory is resumed.
    Steps a killed run logged past its checkpoint are logged again on resume; W&B keeps the
    first value of a step (JSONL and TensorBoard are cut back instead)."""

    def __init__(self, run_dir: Path, settings: WandbSettings, log=print) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "logging.wandb=true needs the wandb package: pip install wandb"
            ) from None
        mode, why = wandb_mode(settings.mode)
        id_file = run_dir / "wandb_run_id"
        # The id survives restarts so that a resumed run continues the same W&B run.
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=settings.project,
            name=settings.name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=settings.config,
        )
        self.mode = mode
        log(
            f"wandb: {mode} ({why})"
            + (
                f"; files in {run_dir / 'wandb'}, upload with `wandb sync`"
                if mode == "offline"
                else ""
            )
        )

    def log(self, row: dict) -> None:
        values = {
            k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)
        }  # fmt: skip
        self.run.log(values, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Rank 0 only. Appends to run_dir/metrics.jsonl (a resumed run continues the file).

    W&B: given `wandb` settings, a W&B run starts here. Without them, the first `log` looks at
    the run's recorded configuration (run_dir/config.json, written by the trainer before its
    first row) and starts one when it has `logging.wandb: true`."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool,
        total_steps: int,
        progress: bool,
        start_step: int = 0,
        wandb: WandbSettings | None = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._drop_after(start_step)
        self.run_dir = run_dir
        self._wandb = WandbLogger(run_dir, wandb) if wandb is not None else None
        self._wandb_checked = wandb is not None
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events a killed run wrote past the
                # checkpoint, as _drop_after does for the JSONL.
                self._tb = SummaryWriter(
                    str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
                )
            except ImportError:
                print("metrics: tensorboard is not installed; writing metrics.jsonl only")
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="AGPO", unit="step", dynamic_ncols=True
            )

    def _drop_after(self, step: int) -> None:
        # After a resume, lines of steps past the checkpoint were never part of this history;
        # a run that starts at step 0 (nothing to resume) starts the file afresh, or an old
        # run's base evaluation would stay beside the new one.
        if not self.path.exists():
            return
        rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        kept = [r for r in rows if r.get("step", 0) <= step] if step > 0 else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, row: dict, step_done: bool = True) -> None:
        """Append a row; step_done=False for rows that are not a training step (the base
        policy's evaluation), which leave the progress bar where it is."""
        # Non-finite values (e.g. the positive-sample loss of a batch with no positives) are
        # written as null: NaN is not JSON.
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["step"])
        if not self._wandb_checked:
            self._wandb_checked = True
            settings = _settings_from_run_config(self.run_dir / "config.json")
            if settings is not None:
                self._wandb = WandbLogger(self.run_dir, settings, log=self.write)
        if self._wandb is not None:
            self._wandb.log(row)
        if self._bar is not None and step_done:
            self._bar.update(1)
            self._bar.set_postfix(
                reward=f"{row.get('reward/mean', float('nan')):.3f}",
                pass_rate=f"{row.get('reward/pass_rate', float('nan')):.3f}",
                loss=f"{row.get('loss', float('nan')):+.4f}",
            )

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def plot_run(metrics_path: Path, out_png: Path) -> Path:
    """Reward and pass rate over steps, plus held-out pass@k curves when evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if any(k.startswith("eval/pass@") for k in r)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward/mean"] for r in train], label="reward (mean)")
    ax.plot(steps, [r["reward/pass_rate"] for r in train], label="pass rate (train)")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval/pass@1"] for r in evals],
            "o-",
            label="pass@1 (held-out)",
        )
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("training")
    ax = axes[1]
    for r in evals:
        ks = sorted(int(k.split("@")[1]) for k in r if k.startswith("eval/pass@"))
        ax.plot(ks, [r[f"eval/pass@{k}"] for k in ks], marker=".", label=f"step {r['step']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out)")
    ax.set_ylim(0, 1)
    if evals:  # a run without held-out evaluation has no curve here
        ax.legend(fontsize=7)
    ax.set_title("reasoning boundary")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
