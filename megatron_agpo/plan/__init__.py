"""`agpo-plan`: memory per GPU, a fits / does-not-fit verdict and a step-time estimate for a
run, read from the same Hydra config the trainer reads (conf/train.yaml plus overrides, and its
`cluster:` section).

    agpo-plan model=llama3_70b cluster.nodes=8 cluster.gpus_per_node=8 cluster.gpu=h100
    agpo-plan model=llama3_70b cluster.nodes=8 --json
    agpo-plan model=llama3_70b cluster.nodes=8 --search
    python -m megatron_agpo.plan model=llama3_70b cluster.nodes=8 --check   # exit 1: no fit

Pure arithmetic (megatron_agpo.plan.memory, .steptime): no weights, no GPU, no torch.distributed.
"""

from __future__ import annotations

from megatron_agpo.plan.cluster import GPU_KINDS, ClusterSection, GpuSpec


def main(argv: list[str] | None = None) -> int:
    from megatron_agpo.plan.cli import main as _main

    return _main(argv)


__all__ = ["GPU_KINDS", "ClusterSection", "GpuSpec", "main"]
