"""`agpo-train` / `python -m megatron_agpo.train`: the AGPO trainer's entry point.

    agpo-train                                   # the CPU default: tiny Llama, TP=2, vLLM
    agpo-train algorithm=grpo trainer.steps=100  # Hydra overrides
    torchrun --nproc_per_node 8 -m megatron_agpo.train model=qwen2_5_math_1_5b ...
    srun python -m megatron_agpo.train ...       # SLURM: one task per GPU

Outside torchrun/srun it starts `nproc` processes itself (torch.distributed.run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_config(overrides: list[str]):
    """conf/train.yaml composed with Hydra overrides, as a validated TrainConfig."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megatron_agpo.trainer.config import TrainConfig, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        composed = compose(config_name="train", overrides=overrides)
    cfg: TrainConfig = OmegaConf.to_object(composed)
    cfg.validate()
    return cfg


def _under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv)
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
            *argv,
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.call(cmd, env=env)
    from megatron_agpo.trainer.loop import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
