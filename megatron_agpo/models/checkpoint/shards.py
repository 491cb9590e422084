"""The model part of a checkpoint: every rank's shards of the model written and read as a
megatron dist checkpoint (any TP/PP/EP), and the model-only checkpoint built on them."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any

import torch

from megatron_agpo.models.checkpoint.layout import (
    COMPLETE,
    MODEL_SUBDIR,
    copy_tokenizer,
    resolve_checkpoint,
)
from megatron_agpo.models.checkpoint.manifest import finalize, model_fields, verify_collective
from megatron_agpo.models.checkpoint.publish import prepare_tmp, publish
from megatron_agpo.models.checkpoint.safe_load import dist_load, load_state_strict
from megatron_agpo.models.config import ModelConfig
from megatron_agpo.parallel import barrier, global_rank


def model_chunks(model):
    from megatron_agpo.models.weights import _unwrap

    return _unwrap(model)


# megatron's torch_dist save (synchronous here) forks one writer process per shard file and
# collects their results through a queue that it creates, at the first save, in a
# multiprocessing Manager: a server process that lives as long as the rank. Neither would die
# with a rank killed by SIGKILL (the Manager outlived it by 15+ minutes; a writer killed
# mid-save left deadlocked). So: the results queue is an in-process queue (a synchronous save
# puts its results in the rank's own process: no Manager is ever started), and every process
# forked while a save runs gets PR_SET_PDEATHSIG=SIGKILL, dying with its rank.
_saving = False
_fork_hook = False


def _writer_dies_with_rank() -> None:
    if not _saving:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the rank died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def no_orphan_writers():
    """Context of a dist-checkpoint save: no Manager server, forked writers die with the
    rank (see above)."""
    global _saving, _fork_hook
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    if not _fork_hook:
        os.register_at_fork(after_in_child=_writer_dies_with_rank)
        _fork_hook = True
    _saving = True
    try:
        yield
    finally:
        _saving = False


def save_model_shards(model, model_dir: Path) -> None:
    """Collective: every rank writes its shards of the model into model_dir."""
    from megatron.core import dist_checkpointing

    if global_rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    (chunk,) = model_chunks(model)  # one model chunk per rank (no virtual pipeline stages)
    with no_orphan_writers():
        dist_checkpointing.save(chunk.sharded_state_dict(), str(model_dir))


def load_model_shards(model, model_dir: Path) -> None:
    """Collective: load model_dir into this rank's shard, whatever TP/PP/EP it was saved at;
    every parameter must be there and nothing else."""
    (chunk,) = model_chunks(model)
    state = dist_load(chunk.sharded_state_dict(), model_dir, "model")
    with torch.no_grad():
        load_state_strict(chunk, state, model_dir)


def save_checkpoint(
    model,
    ckpt_dir: str | Path,
    cfg: ModelConfig,
    hf_dir: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Collective: a model-only checkpoint at ckpt_dir (published atomically), with the
    tokenizer files of hf_dir. ckpt_dir must not hold a checkpoint yet."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / COMPLETE).exists() or (ckpt_dir / MODEL_SUBDIR).exists():
        raise FileExistsError(f"{ckpt_dir} holds a checkpoint already")
    tmp = prepare_tmp(ckpt_dir)
    save_model_shards(model, tmp / MODEL_SUBDIR)
    barrier()
    if global_rank() == 0:
        tok = copy_tokenizer(Path(hf_dir), tmp) if hf_dir else []
        finalize(tmp, {"kind": "model", **model_fields(cfg, hf_dir, tok), **(extra or {})})
        if ckpt_dir.exists():  # an empty folder the caller made
            ckpt_dir.rmdir()
        publish(tmp, ckpt_dir)
    barrier()
    return ckpt_dir


def load_checkpoint(model, ckpt_dir: str | Path) -> dict[str, Any]:
    """Collective: verify (model files) and load any checkpoint's model into this rank's
    shard. Returns the manifest."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    manifest = verify_collective(ckpt_dir, prefixes=(MODEL_SUBDIR + "/",))
    load_model_shards(model, ckpt_dir / MODEL_SUBDIR)
    return manifest
