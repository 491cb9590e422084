"""The project's one checkpoint format: layout, manifest, integrity checks, model shards, and
HF <-> Megatron conversion. `megatron_agpo.trainer.checkpoint` adds the training state
(optimizer, RNG, data position) on top of this layout; every tool reads what either writes.

Layout of a checkpoint folder (a run's `runs/X/checkpoints/step_NNNNNNN`, or the output of
`tools/convert_hf_to_megatron.py`):

    model/              megatron dist checkpoint (torch_dist) of the model; loads at any TP/PP/EP
    optimizer/          run checkpoints only: the distributed optimizer in model space
    rng/rank_NNNNN.pt   run checkpoints only: each rank's RNG states
    trainer_state.json  run checkpoints only: step, weight version, data position, lr schedule
    tokenizer files     copied from the policy's HF folder (tokenizer.json, tokenizer.model, ...)
    manifest.json       format, ModelConfig, the HF config.json, the parallel layout it was
                        written at, and the size and SHA-256 of every other file
    COMPLETE            written last; a folder without it is not a checkpoint

A checkpoint is written into a hidden temporary folder, every file and the folder are
fsync'ed, and it is then renamed into place (an atomic swap when one exists already), so a
reader never sees a partial one. Before loading, every file's SHA-256 is checked against the
manifest, and torch's distributed-checkpoint metadata (a pickle) is first read with a
restricted unpickler that admits only its own record types (see docs/CHECKPOINTS.md).

Modules, by what they hold:

    layout.py       the folder's names, the step folders under a run, the checkpoint a path
                    means, the parallel layout, the tokenizer files
    manifest.py     the manifest: every file's size and SHA-256 written (finalize), checked
                    (verify) on one rank with the verdict on all (errors.broadcast_error)
    safe_load.py    reading a dist checkpoint without running its code
    publish.py      atomic publish of a complete folder; cleaning up interrupted saves
    shards.py       the model part: every rank's shards; model-only checkpoints
    megatron_lm.py  Megatron-LM training checkpoints: the iteration folder, saved arguments
    convert.py      HF <-> Megatron conversion, each in its own process group
    errors.py       CheckpointError
"""

from __future__ import annotations

from megatron_agpo.models.checkpoint.convert import (
    MAX_SHARD_BYTES,
    PROGRESS_MIN_BYTES,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)
from megatron_agpo.models.checkpoint.errors import (
    CheckpointError,
    broadcast_error,
)
from megatron_agpo.models.checkpoint.layout import (
    COMPLETE,
    FORMAT,
    MANIFEST,
    MODEL_SUBDIR,
    OLD_PREFIX,
    PREFIX,
    TMP_PREFIX,
    TOKENIZER_FILES,
    complete_checkpoints,
    copy_tokenizer,
    latest,
    layout_str,
    parallel_layout,
    resolve_checkpoint,
    step_dir,
)
from megatron_agpo.models.checkpoint.manifest import (
    config_from_checkpoint,
    finalize,
    fsync_dir,
    model_fields,
    read_manifest,
    sha256_file,
    verify,
    verify_collective,
)
from megatron_agpo.models.checkpoint.megatron_lm import (
    MLM_TRACKER,
    hf_config_from_megatron_lm_args,
    megatron_lm_args,
    megatron_lm_dir,
    megatron_lm_model_config,
)
from megatron_agpo.models.checkpoint.publish import (
    clean_partial,
    prepare_tmp,
    publish,
)
from megatron_agpo.models.checkpoint.safe_load import (
    check_dcp_dir,
    dist_load,
    load_state_strict,
    read_dcp_metadata,
    safe_torch_load,
)
from megatron_agpo.models.checkpoint.shards import (
    load_checkpoint,
    load_model_shards,
    model_chunks,
    no_orphan_writers,
    save_checkpoint,
    save_model_shards,
)

__all__ = [
    "COMPLETE",
    "CheckpointError",
    "FORMAT",
    "MANIFEST",
    "MAX_SHARD_BYTES",
    "MLM_TRACKER",
    "MODEL_SUBDIR",
    "OLD_PREFIX",
    "PREFIX",
    "PROGRESS_MIN_BYTES",
    "TMP_PREFIX",
    "TOKENIZER_FILES",
    "broadcast_error",
    "check_dcp_dir",
    "clean_partial",
    "complete_checkpoints",
    "config_from_checkpoint",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "copy_tokenizer",
    "dist_load",
    "finalize",
    "fsync_dir",
    "hf_config_from_megatron_lm_args",
    "latest",
    "layout_str",
    "load_checkpoint",
    "load_model_shards",
    "load_state_strict",
    "megatron_lm_args",
    "megatron_lm_dir",
    "megatron_lm_model_config",
    "model_chunks",
    "model_fields",
    "no_orphan_writers",
    "parallel_layout",
    "prepare_tmp",
    "publish",
    "read_dcp_metadata",
    "read_manifest",
    "resolve_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
    "save_model_shards",
    "sha256_file",
    "step_dir",
    "verify",
    "verify_collective",
]
