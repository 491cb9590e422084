"""RL step benchmark on the real trainer: per-stage seconds, tokens/s/GPU, training MFU, refit
GB/s and peak memory per rank, with agpo-plan's prediction beside each measured stage.

    .venv/bin/python benchmarks/rl_step.py [--warmup 2] [--steps 3] [--out runs/bench] \
        [hydra overrides ...]
    srun python benchmarks/rl_step.py model=llama3_70b ...      # one task per GPU

Synthetic load: the configured prompts (arithmetic by default), warm-up steps then measured
steps, the means of the measured ones reported. Writes <out>/rl_step.json and <out>/rl_step.md
(one markdown row in the shape peers publish: GPUs, batch, mean generated length, both
layouts). Outside torchrun/srun it starts `nproc` ranks itself, as agpo-train does.

On CPU the "GPU kind" the prediction uses is measured here first, on every rank at once (the
contention of the run): a float32 matmul at the training's own GEMM shape, a large copy for
memory bandwidth, a gloo all-reduce for the link; efficiencies are then 1 (the rates are
achieved ones). On GPU the config's cluster section is used as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

STAGES = {  # report name -> the trainer's timer
    "generation": "time/rollout",
    "logprobs": "time/logprob",
    "train": "time/update",
    "refit": "time/sync",
}


def _parse(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args(argv)


def _bench_overrides(args) -> list[str]:
    from megatron_agpo.trainer.config import RolloutSection

    out = [
        f"trainer.steps={args.warmup + args.steps}",
        "trainer.eval_every=0",
        "checkpoint.save_final=false",
        "checkpoint.save_every=0",
        "checkpoint.resume=none",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"logging.run_dir={Path(args.out) / 'run'}",
    ]
    if "ignore_eos" in {f.name for f in fields(RolloutSection)}:
        out.append("rollout.ignore_eos=true")  # fixed response length
    return out + list(args.overrides)


def measure_rates(hidden: int, ffn: int, tokens: int) -> dict[str, float]:
    """This rank's achieved float32 matmul TFLOP/s (the training's [tokens, h] x [h, ffn]
    GEMM), copy GB/s (read + write of 256 MiB) and gloo all-reduce bus GB/s."""
    import torch
    import torch.distributed as dist

    def best(fn, reps=5) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    a, b = torch.randn(tokens, hidden), torch.randn(hidden, ffn)
    n_mm = 20
    t = best(lambda: [a @ b for _ in range(n_mm)])
    tflops = 2 * tokens * hidden * ffn * n_mm / t / 1e12
    src = torch.empty(64 * 2**20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = best(lambda: dst.copy_(src))
    copy_gb_s = 2 * src.numel() * 4 / t / 1e9
    link = copy_gb_s
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        buf = torch.ones(4 * 2**20)
        dist.barrier()
        t = best(lambda: dist.all_reduce(buf), reps=3)
        link = 2 * (world - 1) / world * buf.numel() * 4 / t / 1e9
    return {"tflops": tflops, "hbm_gb_s": copy_gb_s, "link_gb_s": link}


def _gather(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run(args) -> dict | None:
    import torch
    import torch.distributed as dist

    from megatron_agpo.backends import detect
    from megatron_agpo.parallel import init_parallel, read_env
    from megatron_agpo.plan import memory as mem
    from megatron_agpo.plan import steptime as st
    from megatron_agpo.plan.config import load_plan_config
    from megatron_agpo.plan.planner import Layout, make_plan, resolve_arch
    from megatron_agpo.trainer.loop import Trainer

    # The run's config with the planner's cluster section (the trainer ignores it).
    cfg = load_plan_config(_bench_overrides(args))
    arch, _ = resolve_arch(cfg)
    cuda = detect().cuda
    rates = None
    if not cuda:
        # Before the engine starts (it would compete for the cores); all ranks at once.
        init_parallel(cfg.parallel)
        mbs, seq = cfg.trainer.micro_batch_size, cfg.rollout.engine.max_model_len
        rates = _gather(measure_rates(arch.hidden_size, arch.ffn_hidden_size, mbs * seq))
    trainer = Trainer(cfg)
    rows = []
    try:
        for _ in range(args.warmup + args.steps):
            rows.append(trainer.train_step())
    finally:
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else rss_kib / 2**20
        peaks = _gather(round(peak, 3))
        world = dist.get_world_size()
        trainer.close()
    if read_env().rank != 0:
        return None
    measured = rows[args.warmup :]
    mean = lambda k: sum(r.get(k, 0.0) for r in measured) / len(measured)  # noqa: E731
    stages = {name: mean(key) for name, key in STAGES.items()}
    stages["reward"] = mean("time/reward")
    total = sum(mean(k) for k in measured[0] if k.startswith("time/"))
    stages["total"] = total
    samples = cfg.data.prompts_per_step * cfg.rollout.n
    gen_len = mean("response/len_mean")
    # Prompt + response tokens of a step (the trainer logs them per second of the step).
    tokens = mean("tokens_per_s") * total if "tokens_per_s" in measured[0] else samples * gen_len
    prompt_len = max(1.0, tokens / samples - gen_len)

    # The planner on the same config, told what it cannot know: the lengths this run produced
    # and, on CPU, the rates measured above.
    c = cfg.cluster
    c.prompt_tokens_mean = max(1, round(prompt_len))
    c.response_tokens_mean = max(1, round(gen_len))
    c.response_tokens_max = max(1, round(max(r["response/len_max"] for r in measured)))
    if rates is not None:
        c.gpu, c.nodes, c.gpus_per_node = "custom", 1, world
        c.memory_gib_override = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        c.bf16_tflops_override = min(r["tflops"] for r in rates)
        c.hbm_gb_s_override = min(r["hbm_gb_s"] for r in rates)
        c.intra_node_gb_s_override = c.inter_node_gb_s_override = min(r["link_gb_s"] for r in rates)
        c.matmul_efficiency = c.hbm_efficiency = c.link_efficiency = 1.0
        c.flash_attention = False
    plan = make_plan(Layout.from_config(cfg), arch, c, "")
    gpu = c.spec()
    seq = prompt_len + gen_len
    train_flops = cfg.trainer.ppo_epochs * 3 * samples * st.forward_flops(arch, seq)
    weight_bytes = mem.total_params(arch) * mem.DTYPE_BYTES[cfg.model.params_dtype]
    gpus = world + plan.layout.rollout_gpus
    result = {
        "gpus": world,
        "rollout_gpus": plan.layout.rollout_gpus,
        "warmup_steps": args.warmup,
        "measured_steps": args.steps,
        "batch": {"prompts": cfg.data.prompts_per_step, "samples": samples},
        "mean_generated_tokens": gen_len,
        "mean_prompt_tokens": prompt_len,
        "fixed_length": "rollout.ignore_eos=true" in _bench_overrides(args),
        "training_layout": {
            "tp": cfg.parallel.tensor_parallel,
            "pp": cfg.parallel.pipeline_parallel,
            "dp": plan.layout.dp,
            "micro_batch": cfg.trainer.micro_batch_size,
            "dtype": cfg.model.params_dtype,
        },
        "rollout_layout": {
            "mode": cfg.rollout.mode,
            "engines": plan.layout.engines,
            "tp": cfg.rollout.engine.tensor_parallel_size,
        },
        "stage_seconds": stages,
        "predicted_seconds": plan.step_time_s,
        "ratio_measured_over_predicted": {
            k: stages[k] / plan.step_time_s[k] if plan.step_time_s[k] > 0 else None
            for k in (*STAGES, "total")
        },
        "tokens_per_s_per_gpu": tokens / (total * gpus),
        "generated_tokens_per_s_per_gpu": samples * gen_len / (stages["generation"] * gpus),
        "train_mfu": train_flops / (stages["train"] * world * gpu.bf16_tflops * 1e12),
        "peak_flops_used_tflops": gpu.bf16_tflops,
        "refit_gb_s": weight_bytes / stages["refit"] / 1e9 if stages["refit"] > 0 else None,
        "peak_memory_gib_per_rank": peaks,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS",
        "measured_rates_per_rank": rates,
        "plan": plan.to_json(),
    }
    return result


def markdown(r: dict) -> str:
    t, p = r["stage_seconds"], r["predicted_seconds"]
    tl, rl = r["training_layout"], r["rollout_layout"]
    cell = lambda k: f"{t[k]:.2f} ({p[k]:.2f})"  # noqa: E731
    head = (
        "| GPUs | batch (prompts x n) | mean generated | training layout | rollout layout | "
        "generation s | log-probs s | train s | refit s | step s | tokens/s/GPU | MFU | "
        "refit GB/s | peak GiB/rank |\n|" + "---|" * 14
    )
    extra = f" + {r['rollout_gpus']}" if r["rollout_gpus"] else ""
    row = (
        f"| {r['gpus']}{extra} | "
        f"{r['batch']['prompts']} x {r['batch']['samples'] // r['batch']['prompts']} | "
        f"{r['mean_generated_tokens']:.1f} | TP{tl['tp']} PP{tl['pp']} DP{tl['dp']} "
        f"{tl['dtype']} | {rl['mode']} {rl['engines']} x TP{rl['tp']} | "
        f"{cell('generation')} | {cell('logprobs')} | {cell('train')} | {cell('refit')} | "
        f"{cell('total')} | {r['tokens_per_s_per_gpu']:.1f} | {r['train_mfu']:.4f} | "
        f"{r['refit_gb_s']:.3f} | {max(r['peak_memory_gib_per_rank']):.2f} |"
    )
    return f"{head}\n{row}\n\nMeasured (agpo-plan's prediction) per stage, mean of measured steps."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    under = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if not under:
        from megatron_agpo.trainer.compose import load_config
        from megatron_agpo.trainer.loop import ensure_policy_dir

        cfg = load_config(_bench_overrides(args))
        ensure_policy_dir(cfg)  # the tiny model's warm start, once, before the ranks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.nproc}", __file__, *argv]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.call(cmd, env=env)
    result = run(args)
    if result is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rl_step.json").write_text(json.dumps(result, indent=1))
        md = markdown(result)
        (out / "rl_step.md").write_text(md + "\n")
        print(md)
        ratios = result["ratio_measured_over_predicted"]
        print("measured / predicted: " + ", ".join(
            f"{k} {v:.2f}" for k, v in ratios.items() if v is not None))  # fmt: skip
        print(f"wrote {out / 'rl_step.json'} and {out / 'rl_step.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
