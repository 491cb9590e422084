"""Run checkpoints: model and optimizer (megatron dist_checkpointing), RNG, data position, step.

A checkpoint is written into a temporary folder and renamed into place only once every rank
has finished, so `latest()` (a scan for complete folders) never returns a partial one, and a
writer killed mid-save leaves the previous checkpoint usable. Partial folders are removed at
the next start.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
PREFIX = "step_"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    if not root.exists():
        return None
    done = [p for p in root.glob(f"{PREFIX}*") if (p / COMPLETE).exists()]
    return max(done, key=lambda p: int(p.name[len(PREFIX) :]), default=None)


def clean_partial(root: Path) -> list[Path]:
    """Remove temporary folders left by interrupted saves (rank 0 only). Returns them."""
    removed = []
    if _rank() == 0 and root.exists():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    _barrier()
    return removed


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _inner_optimizers(optimizer):
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _adam_step(optimizer) -> float:
    """torch Adam's step count (the same for every parameter); 0 before the first step."""
    steps = {
        float(st["step"])
        for o in _inner_optimizers(optimizer)
        for st in o.state.values()
        if "step" in st
    }
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the Adam step: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _set_adam_step(optimizer, step: float) -> None:
    # megatron 0.16.1's dp_reshardable load does not restore torch Adam's `step` (and where it
    # does, it shares one tensor between parameters, which torch then increments once per
    # parameter): set it here, one tensor per parameter.
    for o in _inner_optimizers(optimizer):
        for st in o.state.values():
            st["step"] = torch.tensor(float(step))


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    model_sd = getattr(model, "module", model).sharded_state_dict()
    return {
        "model": model_sd,
        # dp_reshardable: each rank writes its own optimizer shard, no gather; resumes at the
        # same TP/PP (the model part reshards freely).
        "optimizer": optimizer.sharded_state_dict(
            model_sd,
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "dp_reshardable"},
        ),
    }


def save(root: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int) -> Path:
    """Collective. Writes root/step_NNNNNNN atomically and prunes old checkpoints."""
    from megatron.core import dist_checkpointing

    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(tmp / "dist"))
    torch.save({**_rng_state(), "adam_step": _adam_step(optimizer)}, tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    _barrier()
    if _rank() == 0:
        (tmp / COMPLETE).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        complete = sorted(
            (p for p in root.glob(f"{PREFIX}*") if (p / COMPLETE).exists()),
            key=lambda p: int(p.name[len(PREFIX) :]),
        )
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _init_optimizer_state(optimizer) -> None:
    """Give every parameter an (empty) Adam state before loading into it.

    A fresh optimizer has no state until its first step, and megatron's distributed optimizer
    builds its sharded state dict from that state (with torch's Adam, the fallback without
    Apex/TE, it also reads `step`).
    """
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    st["step"] = torch.zeros((), dtype=torch.float32)


def load(path: Path, model, optimizer) -> dict:
    """Collective. Restores model, optimizer and this rank's RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing

    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    _init_optimizer_state(optimizer)
    state = dist_checkpointing.load(
        _sharded_state(model, optimizer, is_loading=True), str(path / "dist")
    )
    with torch.no_grad():  # the optimizer copies into views of leaf parameters
        getattr(model, "module", model).load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(
            f"{rng_file} missing: the checkpoint was written by fewer ranks than this run has"
        )
    rng = torch.load(rng_file, weights_only=True)
    _set_rng_state(rng)
    _set_adam_step(optimizer, rng["adam_step"])
    return json.loads((path / "trainer_state.json").read_text())
