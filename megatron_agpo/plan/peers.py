"""The planner against peers' published step times: NeMo-RL's GRPO runs, synchronous and
one-step off-policy (generation overlapping training), dense and mixture of experts.

    .venv/bin/python -m megatron_agpo.plan.peers            # the table (markdown)
    .venv/bin/python -m megatron_agpo.plan.peers --terms    # and each stage's terms

Each case is our config for the peer's workload (batch, lengths, layout, GPUs), planned by
`agpo-plan`; the assumptions each plan rests on are printed with it (`--assumptions`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

# NeMo-RL's GRPO performance recipes on DGX-H100 (OpenMathInstruct-2), as its repository had
# them when each published number was measured: Llama-3.1-8B from the v0.5 table
# (`examples/configs/recipes/llm/performance/grpo-llama3.1-8b-instruct-2n8g[-async-1off].yaml`
# at NVIDIA-NeMo/RL 108bffdab), Qwen3-30B-A3B from the v0.6 table
# (`grpo-qwen3-30ba3b-4n8g[-async-1off].yaml` at 69c7ca117), both over `grpo_math_1B.yaml`:
# 64 prompts x 32 generations = 2,048 samples a step, training batch 512 (4 optimizer steps),
# sequences of at most 4,096 tokens (`max_new_tokens` = 4,096, capped by vLLM's
# `max_model_len` 4,096), a KL penalty 0.01 against a reference model, BF16, sequence packing
# with 4,096-token training micro-batches (`train_mb_tokens` = 4,096 x micro-batch 1), vLLM at
# 0.6 of the memory colocated (synchronous) or 0.8 on GPUs of its own (one step off).
_WORKLOAD = [
    "model.params_dtype=bfloat16",
    "data.prompts_per_step=64",
    "rollout.n=32",
    "trainer.mini_batches=4",
    "rollout.max_new_tokens=3840",
    "rollout.engine.max_model_len=4096",
    "data.max_prompt_tokens=256",
    "rollout.engine.dtype=bfloat16",
    "rollout.engine.enforce_eager=false",
    "rollout.engine.sync_channel=collective",
    "trainer.micro_batch_size=16",
    "trainer.token_budget=4096",
    "algorithm.loss.kl_coef=0.01",
    "cluster.gpu=h100",
    "cluster.gpus_per_node=8",
    # The prompt (OpenMathInstruct-2 problem in NeMo-RL's chain-of-thought template): about
    # 150 tokens. The longest response fills the 4,096-token context: 4,096 - 150.
    "cluster.prompt_tokens_mean=150",
    "cluster.response_tokens_max=3946",
    # NeMo-RL offloads the training state while vLLM generates; memory is not compared here.
    "cluster.offload_optimizer=true",
]
# The table's "G-Average Seq len" is the mean generated length: on every row, tokens/s/GPU x
# step x GPUs / 2,048 samples exceeds it by 100-160 tokens, the prompt.
# NeMo-RL refits between its steps (the trainer waits for the weights to reach vLLM): the
# sync is not in the background.
_EXTERNAL = ["rollout.engine.launch=external", "rollout.engine.secret_file=/dev/null",
             "rollout.engine.gpu_memory_utilization=0.8", "trainer.max_staleness=1",
             "trainer.background_sync=false"]  # fmt: skip
# Llama: activation checkpointing (full recomputation) in both recipes; training PP2 when
# synchronous, PP1 one step off; vLLM TP1.
_LLAMA = ["model.hf_path=/models/Llama-3.1-8B-Instruct", "parallel.tensor_parallel=1",
          "parallel.sequence_parallel=false", "cluster.recompute=full",
          "rollout.engine.tensor_parallel_size=1"]  # fmt: skip
# Qwen3-30B-A3B: training TP1 EP8 (PP1 synchronous, PP2 one step off), no recomputation;
# vLLM TP2.
_QWEN_MOE = ["model.hf_path=/models/Qwen3-30B-A3B", "parallel.expert_parallel=8",
             "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
             "rollout.engine.tensor_parallel_size=2"]  # fmt: skip


@dataclass(frozen=True)
class PeerCase:
    name: str
    gpus: int
    published_s: float
    source: str
    overrides: tuple[str, ...]


_V05 = "NeMo-RL performance summary, v0.5 table (H100, BF16)"
_V06 = "NeMo-RL performance summary, v0.6 table (H100, BF16)"

CASES = (
    PeerCase(
        "Llama-3.1-8B, synchronous (train PP2; 16 x vLLM TP1)", 16, 92.8, _V05,
        (*_WORKLOAD, *_LLAMA, "cluster.nodes=2", "parallel.pipeline_parallel=2",
         "cluster.response_tokens_mean=1019", "rollout.engine.num_replicas=16",
         "rollout.engine.gpu_memory_utilization=0.6"),
    ),
    PeerCase(
        "Llama-3.1-8B, one step off (8 train + 8 generate)", 16, 64.8, _V05,
        (*_WORKLOAD, *_LLAMA, *_EXTERNAL, "cluster.nodes=1", "cluster.response_tokens_mean=1123",
         "rollout.engine.num_replicas=8"),
    ),
    PeerCase(
        "Qwen3-30B-A3B, synchronous (train EP8; 16 x vLLM TP2)", 32, 192.0, _V06,
        (*_WORKLOAD, *_QWEN_MOE, "cluster.nodes=4", "cluster.response_tokens_mean=3203",
         "rollout.engine.num_replicas=16", "rollout.engine.gpu_memory_utilization=0.6"),
    ),
    PeerCase(
        "Qwen3-30B-A3B, one step off (16 train EP8 PP2 + 16 generate TP2)", 32, 152.0, _V06,
        (*_WORKLOAD, *_QWEN_MOE, *_EXTERNAL, "parallel.pipeline_parallel=2", "cluster.nodes=2",
         "cluster.response_tokens_mean=3201", "rollout.engine.num_replicas=8"),
    ),
)  # fmt: skip


def plan_case(case: PeerCase):
    from megatron_agpo.plan.cli import plan_from_overrides

    plan, _, _ = plan_from_overrides(list(case.overrides))
    return plan


def table(with_assumptions: bool = False, with_terms: bool = False) -> str:
    rows = [
        "| run | GPUs | published s | predicted s (generation / log-probs / train / refit) "
        "| published / predicted |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for case in CASES:
        p = plan_case(case)
        t = p.step_time_s
        assert p.layout.world + p.layout.rollout_gpus == case.gpus, case.name
        stages = " / ".join(f"{t[k]:.1f}" for k in ("generation", "logprobs", "train", "refit"))
        rows.append(f"| {case.name} | {case.gpus} | {case.published_s:g} | {t['total']:.1f} "
                    f"({stages}) | {case.published_s / t['total']:.2f} |")  # fmt: skip
        if with_terms or with_assumptions:
            notes += ["", f"{case.name} ({case.source}):"]
        if with_terms:
            notes += [f"  {k} {v:.2f}" for k, v in p.step_terms_s.items()]
        if with_assumptions:
            notes += [f"  - {a}" for a in p.assumptions]
    return "\n".join(rows + notes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    print(table(with_assumptions="--assumptions" in argv, with_terms="--terms" in argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
