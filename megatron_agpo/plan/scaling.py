"""Scaling on paper: the planner's best layout for 8B and 70B from 8 to 4,096 GPUs.

    .venv/bin/python -m megatron_agpo.plan.scaling [--plot docs/images/plan_scaling.png]

Two series per model: the llama3_70b recipe's batch held fixed (64 prompts x 32 samples), and
the batch grown with the cluster (one prompt of 32 samples per GPU). Each point is the fastest
layout `--search` finds that fits on H100 nodes of 8 GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_agpo.plan.planner import Layout, Plan, resolve_arch, search

GPUS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MODELS = {
    "8B": ["model=llama3_70b", "model.hf_path=/models/Llama-3.1-8B-Instruct"],
    "70B": ["model=llama3_70b"],
}


def best_plans(model_overrides: list[str], scaled: bool) -> list[tuple[int, Plan | None]]:
    from megatron_agpo.plan.config import load_plan_config

    cfg = load_plan_config([*model_overrides, "cluster.nodes=1", "nproc=64"])
    arch, _ = resolve_arch(cfg)
    base = Layout.from_config(cfg)
    out = []
    for n in GPUS:
        prompts = n if scaled else base.prompts
        lay = dataclasses.replace(base, nodes=n // base.gpus_per_node, prompts=prompts)
        found = search(lay, arch, cfg.cluster, top=1)
        out.append((n, found[0] if found else None))
    return out


def table(results: dict[str, list[tuple[int, Plan | None]]]) -> str:
    rows = [
        "| model | batch | GPUs | layout (TP x PP x DP; engines x TP) | step s | generation | "
        "log-probs | train | refit | tokens/s/GPU | MFU |",
        "|" + "---|" * 11,
    ]
    for name, plans in results.items():
        for n, p in plans:
            if p is None:
                rows.append(f"| {name} | | {n} | nothing fits | | | | | | | |")
                continue
            lay, t = p.layout, p.step_time_s
            rows.append(
                f"| {name} | {lay.samples} | {n} | {lay.tp} x {lay.pp} x {lay.dp}; "
                f"{lay.engines} x {lay.engine_tp} | {t['total']:.1f} | {t['generation']:.1f} | "
                f"{t['logprobs']:.1f} | {t['train']:.1f} | {t['refit']:.1f} | "
                f"{p.tokens_per_s_per_gpu:.0f} | {p.train_mfu:.2f} |"
            )
    return "\n".join(rows)


def plot(results: dict[str, list[tuple[int, Plan | None]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, plans in results.items():
        pts = [(n, p) for n, p in plans if p is not None]
        xs = [n for n, _ in pts]
        ax1.plot(xs, [p.tokens_per_s_per_gpu for _, p in pts], marker="o", label=name)
        ax2.plot(xs, [p.step_time_s["total"] for _, p in pts], marker="o", label=name)
    for ax, label in ((ax1, "tokens/s/GPU (predicted)"), (ax2, "step time, s (predicted)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("H100 GPUs")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.suptitle("agpo-plan: best fitting layout per cluster size (analytic, not measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", default="", help="write the plot here (PNG)")
    args = ap.parse_args(argv)
    results = {}
    for name, overrides in MODELS.items():
        results[f"{name}, fixed batch"] = best_plans(overrides, scaled=False)
        results[f"{name}, batch x GPUs"] = best_plans(overrides, scaled=True)
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
