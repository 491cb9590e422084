"""Where checkpoints are: the folder layout's names, the step folders under a run, the
checkpoint a user's path means, the parallel layout a checkpoint is written at, and the
tokenizer files it carries."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_agpo.models.checkpoint.errors import CheckpointError
from megatron_agpo.models.checkpoint.megatron_lm import MLM_TRACKER, megatron_lm_dir

FORMAT = "megatron_agpo/checkpoint-v2"
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
MODEL_SUBDIR = "model"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:07d}"


def _step_of(p: Path) -> int:
    return int(p.name[len(PREFIX) :])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root (a run's checkpoints/ folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.glob(f"{PREFIX}*")
        if p.name[len(PREFIX) :].isdigit() and (p / COMPLETE).is_file()
    ]
    return sorted(done, key=_step_of)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from what a user passes: the folder itself
    (runs/X/checkpoints/step_N), a run folder (runs/X) or its checkpoints/ folder (the latest
    complete one), or a file/folder inside a checkpoint (its checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if (p / MANIFEST).is_file() or (p / COMPLETE).is_file():
        if not (p / COMPLETE).is_file():
            raise CheckpointError(
                f"{p} is not a complete checkpoint (no {COMPLETE} marker: its save was "
                "interrupted); pass the run folder to use the latest complete one"
            )
        return p
    for root in (p / "checkpoints", p):
        found = latest(root)
        if found is not None:
            return found
    for parent in p.parents:  # e.g. the old docs' step_N/dist
        if (parent / COMPLETE).is_file():
            return parent
    if megatron_lm_dir(p) is not None:
        raise CheckpointError(
            f"{p} is a Megatron-LM training checkpoint ({MLM_TRACKER}): convert it with "
            "tools/convert_megatron_to_hf.py (it reads the model part)"
        )
    if (p / "dist").is_dir() or p.name == "dist":
        raise CheckpointError(
            f"{p} is a checkpoint of an older megatron_agpo version (dist/ without "
            f"{MANIFEST}); re-run training with this version to write one that tools can read"
        )
    raise CheckpointError(
        f"{p} holds no complete checkpoint (looked for {COMPLETE} in it, in "
        f"{p / 'checkpoints'}/{PREFIX}*, and in {p}/{PREFIX}*)"
    )


def parallel_layout() -> dict[str, int]:
    """The TP/PP/DP/EP layout of the current process groups (1s when none). expert_parallel:
    each MoE layer's experts split over that many ranks (megatron's expert-model-parallel
    size; 1 for a dense model)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 1,
                "expert_parallel": 1, "world_size": 1}  # fmt: skip
    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(),
        "expert_parallel": ps.get_expert_model_parallel_world_size(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def layout_str(layout: dict[str, int]) -> str:
    """TP=2 PP=1 DP=1, with " EP=n" when the experts are split (n > 1; a layout written
    before expert parallelism existed has no key: 1)."""
    out = (
        f"TP={layout.get('tensor_parallel')} PP={layout.get('pipeline_parallel')} "
        f"DP={layout.get('data_parallel')}"
    )
    ep = layout.get("expert_parallel", 1)
    return out + (f" EP={ep}" if ep != 1 else "")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
