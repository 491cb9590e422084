"""The planner against peers' published step times: NeMo-RL's GRPO runs, synchronous and
one-step off-policy (generation overlapping training), dense and mixture of experts.

    .venv/bin/python -m megatron_agpo.plan.peers            # the table (markdown)

Each case is our config for the peer's workload (batch, lengths, layout, GPUs), planned by
`agpo-plan`; the assumptions each plan rests on are printed with it (`--assumptions`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

# NeMo-RL's GRPO performance recipes on DGX-H100 (OpenMathInstruct-2): 64 prompts x 32
# generations = 2,048 samples a step, training batch 512 (4 optimizer steps), sequences of at
# most 4,096 tokens, a KL penalty against a reference model, BF16; vLLM colocated with
# training when synchronous, on GPUs of its own when one step off. Mean sequence lengths and
# layouts are the ones NeMo-RL's performance summary lists with its runs (v0.4 table: Llama
# 1,060 / 1,129 tokens, Qwen3-30B-A3B 3,154 / 3,158).
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
    "trainer.token_budget=8192",
    "algorithm.loss.kl_coef=0.01",
    "cluster.gpu=h100",
    "cluster.gpus_per_node=8",
    "cluster.prompt_tokens_mean=150",
    # NeMo-RL offloads the training state while vLLM generates; memory is not compared here.
    "cluster.offload_optimizer=true",
]
_EXTERNAL = ["rollout.engine.launch=external", "rollout.engine.secret_file=/dev/null",
             "rollout.engine.gpu_memory_utilization=0.85", "trainer.max_staleness=1"]  # fmt: skip
_LLAMA = ["model.hf_path=/models/Llama-3.1-8B-Instruct", "parallel.tensor_parallel=1",
          "parallel.sequence_parallel=false", "cluster.response_tokens_mean=910"]  # fmt: skip
_QWEN_MOE = ["model.hf_path=/models/Qwen3-30B-A3B", "parallel.expert_parallel=8",
             "cluster.response_tokens_mean=3000"]  # fmt: skip


@dataclass(frozen=True)
class PeerCase:
    name: str
    gpus: int
    published_s: float
    source: str
    overrides: tuple[str, ...]


CASES = (
    PeerCase(
        "Llama-3.1-8B, synchronous", 16, 92.8,
        "NeMo-RL performance summary (quoted in the peers' survey)",
        (*_WORKLOAD, *_LLAMA, "cluster.nodes=2", "rollout.engine.num_replicas=16",
         "rollout.engine.tensor_parallel_size=1", "rollout.engine.gpu_memory_utilization=0.4"),
    ),
    PeerCase(
        "Llama-3.1-8B, one step off (8 train + 8 generate)", 16, 64.8,
        "NeMo-RL performance summary (quoted in the peers' survey)",
        (*_WORKLOAD, *_LLAMA, *_EXTERNAL, "cluster.nodes=1", "rollout.engine.num_replicas=8",
         "rollout.engine.tensor_parallel_size=1"),
    ),
    PeerCase(
        "Qwen3-30B-A3B, synchronous (train TP2 EP8; vLLM TP4)", 32, 192.0,
        "NeMo-RL performance summary (quoted in the peers' survey)",
        (*_WORKLOAD, *_QWEN_MOE, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
         "cluster.nodes=4", "rollout.engine.num_replicas=8",
         "rollout.engine.tensor_parallel_size=4", "rollout.engine.gpu_memory_utilization=0.5"),
    ),
    PeerCase(
        "Qwen3-30B-A3B, one step off (16 train TP1 EP8 PP2 + 16 generate TP2)", 32, 152.0,
        "NeMo-RL performance summary (quoted in the peers' survey)",
        (*_WORKLOAD, *_QWEN_MOE, *_EXTERNAL, "parallel.tensor_parallel=1",
         "parallel.sequence_parallel=false", "parallel.pipeline_parallel=2", "cluster.nodes=2",
         "rollout.engine.num_replicas=8", "rollout.engine.tensor_parallel_size=2"),
    ),
)  # fmt: skip


def plan_case(case: PeerCase):
    from megatron_agpo.plan.cli import plan_from_overrides

    plan, _, _ = plan_from_overrides(list(case.overrides))
    return plan


def table(with_assumptions: bool = False) -> str:
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
        if with_assumptions:
            notes += ["", f"{case.name}:", *(f"  - {a}" for a in p.assumptions)]
    return "\n".join(rows + notes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    print(table(with_assumptions="--assumptions" in argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
