"""The command line of `agpo-plan`: Hydra overrides plus --json, --search, --check."""

from __future__ import annotations

import json
import sys

from megatron_agpo.plan.planner import TERMS, Layout, Plan, make_plan, resolve_arch, search

USAGE = """usage: agpo-plan [hydra overrides ...] [--json] [--search [--top N]] [--check]

The run's config (conf/train.yaml + overrides, as agpo-train reads it) planned on its
cluster section: memory per GPU, a verdict and a step-time estimate.
  --json     the plan as JSON (keys: fits, memory_gib, step_time_s, tokens_per_s_per_gpu,
             train_mfu, assumptions, ...)
  --search   the fastest layouts that fit (TP, PP, micro-batch, engine TP and memory share)
  --top N    how many --search prints (default 10)
  --check    one line; exit 0 when the plan fits, 1 when it does not
e.g. agpo-plan model=llama3_70b cluster.nodes=8 cluster.gpus_per_node=8 cluster.gpu=h100"""


def _gib(x: float) -> str:
    return f"{x:7.1f}"


def render(plan: Plan, source: str) -> str:
    lay, g = plan.layout, plan.gpu
    lines = [
        f"model: {plan.model} ({plan.params / 1e9:.2f}B parameters; {source})",
        f"cluster: {lay.nodes} node(s) x {lay.gpus_per_node} {g.name} ({g.memory_gib:.1f} GiB)",
        f"training: TP={lay.tp} PP={lay.pp} VP={lay.vp} CP={lay.cp} DP={lay.dp} "
        f"SP={'on' if lay.sequence_parallel else 'off'} recompute={lay.recompute} "
        f"micro-batch={lay.micro_batch} distributed optimizer="
        f"{'on' if lay.distributed_optimizer else 'off'} {lay.params_dtype} fp8={lay.fp8} "
        f"offload={'on' if lay.offload_optimizer else 'off'}",
        f"rollout: {lay.rollout_mode}"
        f"{f' on {lay.rollout_gpus} GPUs of their own' if lay.engines_on_own_gpus else ''}, "
        f"{lay.engines} engine(s) x TP {lay.engine_tp}"
        f"{f', {lay.engine_quantization} weights' if lay.engine_quantization else ''}, memory "
        f"fraction {lay.engine_memory_fraction:g}, context {lay.context_len}, "
        f"{lay.prompts} prompts x {lay.samples_per_prompt} samples, max {lay.max_new_tokens} new "
        f"tokens",
        f"passes: old log-probs {'recomputed' if lay.recompute_old_logp else 'from the engine'}"
        f", reference model {'yes' if lay.reference_model else 'no (kl_coef 0)'}",
        "",
        f"memory per GPU, pipeline stage {plan.stage} (the most loaded), GiB, "
        f"during {plan.peak_phase}:",
    ]
    for k in (*TERMS, "overhead"):
        lines.append(f"  {k:<12}{_gib(plan.memory_gib[k])}")
    lines.append(f"  {'total':<12}{_gib(plan.memory_gib['total'])}   "
                 f"(training {plan.memory_by_phase_gib['training']:.1f}, generation "
                 f"{plan.memory_by_phase_gib['generation']:.1f})")  # fmt: skip
    lines.append(f"  KV cache left to each engine: {plan.kv_cache_tokens:,} tokens")
    lines.append(f"verdict: {plan.reason}")
    t = plan.step_time_s
    lines += [
        "",
        "step time estimate, s: " + ", ".join(f"{k} {t[k]:.2f}" for k in t),
        f"tokens/s/GPU {plan.tokens_per_s_per_gpu:.1f}, training MFU {plan.train_mfu:.3f}",
        "",
        "assumptions:",
        *(f"  - {a}" for a in plan.assumptions),
    ]
    return "\n".join(lines)


def render_search(plans: list[Plan]) -> str:
    if not plans:
        return "no layout the trainer runs fits this model on this cluster"
    head = (
        "| rank | TP | PP | DP | mbs | engines x TP | mem. fraction | peak GiB | step s "
        "| tok/s/GPU | MFU |"
    )
    rows = [head, "|" + "---|" * 11]
    for i, p in enumerate(plans, 1):
        lay = p.layout
        rows.append(
            f"| {i} | {lay.tp} | {lay.pp} | {lay.dp} | {lay.micro_batch} | {lay.engines} x "
            f"{lay.engine_tp} | {lay.engine_memory_fraction:g} | {p.memory_gib['total']:.1f} | "
            f"{p.step_time_s['total']:.1f} | {p.tokens_per_s_per_gpu:.1f} | {p.train_mfu:.3f} |"
        )
    rows.append("")
    rows.append("overrides of the fastest: " + " ".join(plans[0].layout.overrides()))
    return "\n".join(rows)


def _composed(overrides: list[str]):
    """conf/train.yaml with the overrides under the planner's schema, composed but not
    validated."""
    from megatron_agpo.plan.config import plan_schema
    from megatron_agpo.trainer.compose import compose, load_plugins

    load_plugins(overrides)
    return compose(overrides, root=plan_schema())


def _cluster_world(overrides: list[str]) -> int:
    """nodes x gpus_per_node of the composed cluster section."""
    c = _composed(overrides).cluster
    return int(c.nodes) * int(c.gpus_per_node)


def plan_from_overrides(overrides: list[str]) -> tuple[Plan, str, object]:
    """(plan, where the architecture came from, the PlanConfig) for Hydra overrides."""
    from megatron_agpo.plan.config import load_plan_config

    if not any(o.split("=", 1)[0].lstrip("+") == "nproc" for o in overrides):
        # The trainer's ranks on the planned cluster: what srun starts (nproc only matters
        # when agpo-train launches itself, and is validated against TP x PP).
        overrides = [*overrides, f"nproc={_cluster_world(overrides)}"]
    composed = _composed(overrides)
    fp8 = composed.model.get("fp8", "none") or "none"
    quant = composed.rollout.engine.get("quantization", "") or ""
    cp = int(composed.parallel.get("context_parallel", 1) or 1)
    planned = None
    try:
        cfg = load_plan_config(overrides)
    except Exception:
        if fp8 == "none" and not quant and cp == 1:
            raise
        # FP8 needs Transformer Engine / vLLM on a capable GPU, which the machine that plans
        # need not have: validate the rest, plan the FP8 run.
        # So does context parallelism (Transformer Engine's attention).
        neutral = [*overrides, "model.fp8=none", "parallel.context_parallel=1"]
        if quant:
            neutral.append("rollout.engine.quantization=")
        cfg = load_plan_config(neutral)
        planned = (fp8, quant)
    arch, source = resolve_arch(cfg)
    name = source.rsplit("/", 1)[-1].removesuffix(".json") if "/" in source else source
    if name == "config":
        name = source.rsplit("/", 2)[-2]
    layout = Layout.from_config(cfg)
    if planned:
        layout.fp8, layout.engine_quantization = str(planned[0]), str(planned[1])
        layout.cp = max(layout.cp, cp)
    plan = make_plan(layout, arch, cfg.cluster, name)
    if planned:
        plan.assumptions.append(
            "FP8 / context parallelism availability not checked here (no Transformer Engine "
            "/ capable GPU on this machine); agpo-train checks it where it runs"
        )
    return plan, source, (cfg, arch)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    flags = {"--json", "--search", "--check"}
    top = 10
    if "--top" in argv:
        i = argv.index("--top")
        try:
            top = int(argv[i + 1])
        except (IndexError, ValueError):
            print("agpo-plan: --top needs a number", file=sys.stderr)
            return 2
        del argv[i : i + 2]
    opts = {a for a in argv if a in flags}
    unknown = [a for a in argv if a.startswith("--") and a not in flags]
    if unknown:
        print(f"agpo-plan: unknown option {unknown[0]}\n{USAGE}", file=sys.stderr)
        return 2
    overrides = [a for a in argv if a not in flags]
    try:
        plan, source, (cfg, arch) = plan_from_overrides(overrides)
        found = search(plan.layout, arch, cfg.cluster, top) if "--search" in opts else None
    except Exception as e:  # noqa: BLE001 - bad input is one line, not a traceback
        kind = type(e).__name__
        msg = str(e).strip().splitlines()[0] if str(e).strip() else kind
        print(f"agpo-plan: {msg}", file=sys.stderr)
        return 2
    if "--check" in opts:
        print(f"agpo-plan: {plan.reason}")
        return 0 if plan.fits else 1
    if "--json" in opts:
        out = plan.to_json()
        if found is not None:
            out["search"] = [{**p.to_json(), "overrides": p.layout.overrides()} for p in found]
        print(json.dumps(out, indent=1))
        return 0
    print(render(plan, source))
    if found is not None:
        print("\nlayouts that fit, fastest first:\n" + render_search(found))
    return 0
