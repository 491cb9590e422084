"""Metrics: one JSON line per step, TensorBoard when installed, a progress bar, a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    """Rank 0 only. Appends to run_dir/metrics.jsonl (a resumed run continues the file)."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool,
        total_steps: int,
        progress: bool,
        start_step: int = 0,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._drop_after(start_step)
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
    ax.legend(fontsize=7)
    ax.set_title("reasoning boundary")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
