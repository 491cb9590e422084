"""The project's one checkpoint format: layout, manifest, integrity checks, model shards, and
HF <-> Megatron conversion. `megatron_agpo.trainer.checkpoint` adds the training state
(optimizer, RNG, data position) on top of this layout; every tool reads what either writes.

Layout of a checkpoint folder (a run's `runs/X/checkpoints/step_NNNNNNN`, or the output of
`tools/convert_hf_to_megatron.py`):

    model/              megatron dist checkpoint (torch_dist) of the model; loads at any TP/PP
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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_agpo.models.config import ModelConfig
from megatron_agpo.models.weights import HFWeights, megatron_to_hf_tensors
from megatron_agpo.parallel import broadcast_bytes

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
# Shard size of exported safetensors files.
MAX_SHARD_BYTES = 2 * 1024**3
# Show a progress bar when a conversion moves more than this.
PROGRESS_MIN_BYTES = 256 * 1024**2
_HASH_CHUNK = 8 * 1024**2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupted, from another model or
    an incompatible layout. The message names the file and what to do."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_error(err: str | None) -> None:
    """Rank 0's verdict on every rank: all raise the same error, or none does. Sent as UTF-8
    bytes in a tensor (NCCL needs it on the GPU), never pickled."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        nccl = dist.get_backend() == "nccl"
        dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        err = broadcast_bytes((err or "").encode(), 0, device=dev).decode()
    if err:
        raise CheckpointError(err)


# ----------------------------------------------------------------------------- where
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


# ----------------------------------------------------------------------------- manifest
def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _payload_files(ckpt_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.relative_to(ckpt_dir).as_posix() not in (MANIFEST, COMPLETE)
    )


def parallel_layout() -> dict[str, int]:
    """The TP/PP/DP layout of the current process groups (1s when none)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 1, "world_size": 1}
    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def layout_str(layout: dict[str, int]) -> str:
    return (
        f"TP={layout.get('tensor_parallel')} PP={layout.get('pipeline_parallel')} "
        f"DP={layout.get('data_parallel')}"
    )


def finalize(ckpt_dir: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank wrote its files: hash and fsync every file, write the manifest
    and the COMPLETE marker, fsync them and the folders."""
    ckpt_dir = Path(ckpt_dir)
    files = {}
    for f in _payload_files(ckpt_dir):
        files[f.relative_to(ckpt_dir).as_posix()] = {
            "bytes": f.stat().st_size,
            "sha256": sha256_file(f, fsync=True),
        }
    manifest = {"format": FORMAT, **fields, "files": files}
    for name, text in ((MANIFEST, json.dumps(manifest, indent=1, default=str)), (COMPLETE, "")):
        with open(ckpt_dir / name, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    for d in sorted({p.parent for p in ckpt_dir.rglob("*")} | {ckpt_dir}, reverse=True):
        _fsync_dir(d)
    return manifest


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a megatron_agpo checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupted (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: format {got!r}, this version reads {FORMAT!r}")
    return manifest


def verify(ckpt_dir: str | Path, prefixes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check every file listed in the manifest (or those under `prefixes`) for presence, size
    and SHA-256. Returns the manifest; raises CheckpointError naming the first bad file."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt_dir} is not a complete checkpoint (no {COMPLETE} marker)")
    manifest = read_manifest(ckpt_dir)
    for rel, want in manifest["files"].items():
        if prefixes is not None and not rel.startswith(prefixes) and "/" in rel:
            continue
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {ckpt_dir / MANIFEST})")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"{f} is {size} bytes, the manifest says {want['bytes']}: the file was "
                "truncated or changed after the save; resume from another checkpoint "
                "(checkpoint.resume=PATH, or checkpoint.resume_fallback=true)"
            )
        if sha256_file(f) != want["sha256"]:
            raise CheckpointError(
                f"{f} does not match its SHA-256 in {ckpt_dir / MANIFEST}: the file is "
                "corrupted (bit flips, a partial copy) or was changed after the save; resume "
                "from another checkpoint (checkpoint.resume=PATH, or "
                "checkpoint.resume_fallback=true)"
            )
    return manifest


def verify_collective(ckpt_dir: Path, prefixes: tuple[str, ...] | None = None) -> dict:
    """Collective verify(): rank 0 reads and hashes, every rank gets the verdict."""
    err = None
    if _rank() == 0:
        try:
            verify(ckpt_dir, prefixes)
        except CheckpointError as e:
            err = str(e)
    _broadcast_error(err)
    return read_manifest(ckpt_dir)


# ----------------------------------------------------------------------------- safe metadata
# What torch's distributed-checkpoint `.metadata` pickle may reference: its own record types,
# torch.Size and dtypes. Anything else (os.system, builtins.eval, ...) is refused unexecuted.
_DCP_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
        "LoadItemType",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _DCP_ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not a checkpoint record type")


def read_dcp_metadata(path: Path):
    """torch's distributed-checkpoint metadata, unpickled with only its own record types
    admitted: a crafted file is refused before any of its code runs."""
    try:
        return _DcpUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse is the file's fault
        raise CheckpointError(
            f"{path} was refused: {e}. This file is read with a restricted unpickler; a "
            "checkpoint whose metadata references other code is not loaded"
        ) from None


def check_dcp_dir(d: Path) -> None:
    """Refuse a dist-checkpoint folder whose metadata is not plain records."""
    meta = read_dcp_metadata(Path(d) / ".metadata")
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{Path(d) / '.metadata'} does not hold checkpoint metadata")


# torch's distributed-checkpoint loader unpickles every bytes item (megatron's ShardedObjects,
# e.g. each layer's `_extra_state`) with `torch.load(weights_only=False)`, and megatron reads
# `.metadata` with the full unpickler: a checkpoint could run code at load. Here every read of
# a dist checkpoint goes through megatron's own torch_dist strategy with three parts swapped:
# the metadata through the restricted unpickler above, the bytes items through torch's
# weights-only unpickler (with the safe globals megatron registers), and common.pt
# weights-only too. The strategies are passed explicitly, so a crafted metadata.json cannot
# select another backend's loader either.
_refused: list[str] = []


def _unpickle_refusal(e: Exception) -> str:
    import re

    text = str(e)
    m = re.search(r"(unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+)", text)
    if m:
        return f"it references code ({m.group(1).split()[-1]})"
    m = re.search(r"Unsupported operand[^\n]*", text)
    return m.group(0) if m else " ".join(text.split())[:200]


def safe_torch_load(data, where: str):
    """torch.load of checkpoint bytes (a file path or a BytesIO), weights-only with megatron's
    safe globals; anything else is refused naming `where`."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{where} is missing") from None
    except Exception as e:  # noqa: BLE001 - a refused global, a corrupt pickle
        raise CheckpointError(
            f"{where} was refused: {_unpickle_refusal(e)}. Checkpoint content is read as data "
            "only (weights-only unpickler); a checkpoint that references other code is not "
            "loaded"
        ) from None


def _safe_dcp_classes(d: Path):
    from megatron.core.dist_checkpointing.strategies import torch as mstrat
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(CachedMetadataFileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{self.path}: per-rank metadata files are not read")
            if self._cached_metadata is None:
                path = Path(str(self.path)) / ".metadata"
                meta = read_dcp_metadata(path)
                if not isinstance(meta, Metadata):
                    raise CheckpointError(f"{path} does not hold checkpoint metadata")
                if getattr(meta, "storage_meta", None) is None:
                    meta.storage_meta = StorageMeta()
                meta.storage_meta.load_id = self.load_id
                self._cached_metadata = meta
            return self._cached_metadata

    class SafePlanner(mstrat.MCoreLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            info = self.metadata.storage_data.get(read_item.storage_index)
            where = f"{Path(d) / getattr(info, 'relative_path', '?')} (item {fqn})"
            try:
                obj = safe_torch_load(value, where)
            except CheckpointError as e:
                _refused.append(str(e))
                raise
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    class SafeShardedLoad(mstrat.TorchDistLoadShardedStrategy):
        def _swapped(self, fn, *args):
            saved = mstrat.MCoreLoadPlanner, mstrat._get_filesystem_reader
            mstrat.MCoreLoadPlanner = SafePlanner
            mstrat._get_filesystem_reader = lambda d, cache_metadata=False: SafeReader(d)
            try:
                return fn(*args)
            finally:
                mstrat.MCoreLoadPlanner, mstrat._get_filesystem_reader = saved

        def load(self, sharded_state_dict, checkpoint_dir):
            return self._swapped(super().load, sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            return self._swapped(super().load_tensors_metadata, checkpoint_dir, metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            return self._swapped(super().load_sharded_metadata, checkpoint_dir)

    class SafeCommonLoad(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            path = Path(checkpoint_dir) / "common.pt"
            return safe_torch_load(path, str(path))

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise CheckpointError(f"{checkpoint_dir}: per-object .pt files are not read")

    return SafeShardedLoad, SafeCommonLoad


def dist_load(sharded_state: dict, d: Path, what: str, extra_ok: bool = False) -> dict:
    """megatron dist_checkpointing.load with nothing unpickled beyond data (see above) and
    every key checked both ways (RAISE_ALL; extra_ok: the checkpoint may hold more, e.g. a
    Megatron-LM checkpoint's optimizer), errors naming the folder."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    check_dcp_dir(d)
    sharded, common = _safe_dcp_classes(d)
    strict = StrictHandling.RAISE_UNEXPECTED if extra_ok else StrictHandling.RAISE_ALL
    _refused.clear()
    try:
        return dist_checkpointing.load(
            sharded_state, str(d), sharded_strategy=sharded(), common_strategy=common(),
            strict=strict,
        )  # fmt: skip
    except CheckpointError as e:
        raise CheckpointError(f"loading the {what}: {e}") from None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - megatron raises several
        # types, torch's CheckpointException is a BaseException: name the folder
        if _refused:  # torch wraps the planner's error with every rank's traceback
            raise CheckpointError(f"loading the {what}: {_refused[0]}") from None
        msg = " ".join(str(e).split())
        if len(msg) > 1500:
            msg = msg[:1500] + " ..."
        raise CheckpointError(f"loading the {what} from {d} failed: {msg}") from e


def load_state_strict(module, state: dict, where: Path) -> None:
    """module.load_state_dict(strict) with the missing and unexpected keys in the error."""
    res = module.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in res.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit this model: missing keys {missing or 'none'}; unexpected "
            f"keys {unexpected or 'none'}"
        )


# ----------------------------------------------------------------------------- publish
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"renameat2({a}, {b})")


def publish(tmp: Path, final: Path) -> None:
    """Rank 0: make the complete folder tmp visible as final. A final that exists already is
    swapped atomically (or, where renameat2 is unsupported, moved aside first and restored by
    clean_partial if we die in between), so there is never a moment without it."""
    if final.exists():
        if _exchange(tmp, final):
            _fsync_dir(final.parent)
            shutil.rmtree(tmp)  # now the old one
            return
        old = final.with_name(OLD_PREFIX + final.name)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        _fsync_dir(final.parent)
        shutil.rmtree(old)
        return
    tmp.rename(final)
    _fsync_dir(final.parent)


def clean_partial(root: Path) -> list[Path]:
    """Collective. Remove temporary folders of interrupted saves; put back a checkpoint moved
    aside by an interrupted re-save. Returns what was removed."""
    removed = []
    root = Path(root)
    if _rank() == 0 and root.exists():
        for p in root.glob(OLD_PREFIX + "*"):
            final = root / p.name[len(OLD_PREFIX) :]
            if not (final / COMPLETE).is_file() and (p / COMPLETE).is_file():
                shutil.rmtree(final, ignore_errors=True)
                p.rename(final)
            else:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        for p in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    _barrier()
    return removed


def prepare_tmp(final: Path) -> Path:
    """Collective: a fresh empty temporary folder beside final."""
    tmp = final.with_name(TMP_PREFIX + final.name)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


# ----------------------------------------------------------------------------- model part
def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def model_fields(cfg: ModelConfig, hf_dir: str | Path | None, tokenizer: list[str]) -> dict:
    """The manifest fields that describe the model (every checkpoint has them)."""
    hf_config = None
    if hf_dir is not None and (Path(hf_dir) / "config.json").is_file():
        hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    return {
        "model_config": cfg.to_dict(),
        "hf_config": hf_config,
        "tokenizer_files": tokenizer,
        "layout": parallel_layout(),
    }


def config_from_checkpoint(ckpt_dir: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_manifest(ckpt_dir)["model_config"])


def _chunks(model):
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

    if _rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    (chunk,) = _chunks(model)  # one model chunk per rank (no virtual pipeline stages)
    with no_orphan_writers():
        dist_checkpointing.save(chunk.sharded_state_dict(), str(model_dir))


def load_model_shards(model, model_dir: Path) -> None:
    """Collective: load model_dir into this rank's shard, whatever TP/PP it was saved at;
    every parameter must be there and nothing else."""
    (chunk,) = _chunks(model)
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
    _barrier()
    if _rank() == 0:
        tok = copy_tokenizer(Path(hf_dir), tmp) if hf_dir else []
        finalize(tmp, {"kind": "model", **model_fields(cfg, hf_dir, tok), **(extra or {})})
        if ckpt_dir.exists():  # an empty folder the caller made
            ckpt_dir.rmdir()
        publish(tmp, ckpt_dir)
    _barrier()
    return ckpt_dir


def load_checkpoint(model, ckpt_dir: str | Path) -> dict[str, Any]:
    """Collective: verify (model files) and load any checkpoint's model into this rank's
    shard. Returns the manifest."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    manifest = verify_collective(ckpt_dir, prefixes=(MODEL_SUBDIR + "/",))
    load_model_shards(model, ckpt_dir / MODEL_SUBDIR)
    return manifest


# ----------------------------------------------------------------------------- Megatron-LM
MLM_TRACKER = "latest_checkpointed_iteration.txt"


def megatron_lm_dir(path: str | Path) -> Path | None:
    """The iteration folder of a Megatron-LM training checkpoint (torch_dist format): given
    its root (with latest_checkpointed_iteration.txt) or an iter_NNNNNNN folder; else None."""
    p = Path(path)
    if (p / MLM_TRACKER).is_file():
        it = (p / MLM_TRACKER).read_text().strip()
        d = p / ("release" if it == "release" else f"iter_{int(it):07d}" if it.isdigit() else it)
        if not (d / ".metadata").is_file():
            raise CheckpointError(
                f"{p / MLM_TRACKER} names iteration {it!r}, but {d} holds no torch_dist "
                "checkpoint (.metadata); only the torch_dist format is read"
            )
        return d
    if (p.name.startswith("iter_") or p.name == "release") and (p / ".metadata").is_file():
        return p
    return None


def megatron_lm_args(iter_dir: Path) -> dict[str, Any]:
    """The training arguments saved in a Megatron-LM checkpoint (common.pt), read with
    torch's weights-only unpickler (argparse.Namespace admitted, nothing else)."""
    import argparse

    path = Path(iter_dir) / "common.pt"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: give the model config (--hf-config)") from None
    except Exception as e:  # noqa: BLE001 - refused types, corrupt file
        raise CheckpointError(
            f"{path}: its saved arguments cannot be read safely ({' '.join(str(e).split())[:300]}"
            "); give the model config instead (--hf-config config.json)"
        ) from None
    args = state.get("args") if isinstance(state, dict) else None
    if args is None:
        raise CheckpointError(f"{path} holds no saved arguments: give --hf-config")
    return vars(args)


def hf_config_from_megatron_lm_args(a: dict[str, Any], vocab_size: int | None) -> dict:
    """An HF config (Llama, or Qwen2 with QKV bias) equivalent to Megatron-LM's arguments."""

    def need(key: str, want) -> None:
        if a.get(key, want) != want:
            raise CheckpointError(
                f"Megatron-LM argument {key}={a.get(key)!r}: only {want!r} maps to the "
                "supported architectures (Llama, Qwen2)"
            )

    need("swiglu", True)
    need("normalization", "RMSNorm")
    need("position_embedding_type", "rope")
    heads = a["num_attention_heads"]
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    dtype = "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else "float32"
    return {
        "architectures": ["Qwen2ForCausalLM" if a.get("add_qkv_bias") else "LlamaForCausalLM"],
        "model_type": "qwen2" if a.get("add_qkv_bias") else "llama",
        "hidden_size": a["hidden_size"],
        "intermediate_size": a["ffn_hidden_size"],
        "num_hidden_layers": a["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": groups or heads,
        "head_dim": a.get("kv_channels") or a["hidden_size"] // heads,
        "vocab_size": vocab_size or a["padded_vocab_size"],
        "max_position_embeddings": a.get("max_position_embeddings", 4096),
        "rope_theta": float(a.get("rotary_base", 10000)),
        "rms_norm_eps": float(a.get("norm_epsilon", 1e-5)),
        "tie_word_embeddings": not a.get("untie_embeddings_and_output_weights", False),
        "hidden_act": "silu",
        "dtype": dtype,
    }


# ----------------------------------------------------------------------------- conversion
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn_name: str, kwargs: dict) -> None:
    # A one-process world runs in the caller's process: its launcher variables are put back
    # afterwards, or every later `agpo-train` started from this process would believe it is
    # a rank of that world (RANK set) and reuse its port.
    launch = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                  WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    saved = {k: os.environ.get(k) for k in launch}
    os.environ.update(launch)
    try:
        globals()[fn_name](**kwargs)
    finally:
        from megatron_agpo.parallel import destroy_parallel

        destroy_parallel()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_in_world(fn_name: str, world: int, **kwargs) -> None:
    """Run fn in `world` fresh processes (the converters' own process groups)."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _worker, args=(world, _free_port(), fn_name, kwargs), nprocs=world, start_method="spawn"
    )


def _hf_dtype(hf: HFWeights) -> str:
    dt = hf.get("model.embed_tokens.weight").dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]


def _convert_hf_rank(hf_dir: str, out_dir: str, tp: int, pp: int) -> None:
    from megatron_agpo.models.build import build_model
    from megatron_agpo.models.weights import load_hf_weights
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    hf = HFWeights(hf_dir)
    # The stored tensors' dtype wins over config.json's (a GGUF export may say bfloat16 and
    # hold float32); keeping it is what makes the round trip bit-exact.
    cfg = ModelConfig.from_hf(hf_dir, params_dtype=_hf_dtype(hf))
    cfg.validate(tensor_parallel=tp, pipeline_parallel=pp)
    model = build_model(cfg)
    load_hf_weights(model, hf, cfg)
    save_checkpoint(model, out_dir, cfg, hf_dir=hf_dir, extra={"source": str(hf_dir)})


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1):
    """HF folder -> megatron_agpo checkpoint written by tp*pp ranks (spawned here on CPU when
    no process group exists; collective when one does). Returns the ModelConfig."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = ModelConfig.from_hf(hf_dir)
    cfg.validate(tensor_parallel=tp, pipeline_parallel=pp)  # fail before spawning anything
    if (out_dir / COMPLETE).exists() or (out_dir.exists() and any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} is not empty")
    kwargs = dict(hf_dir=str(hf_dir), out_dir=str(out_dir), tp=tp, pp=pp)
    if dist.is_initialized():
        _convert_hf_rank(**kwargs)
    elif tp * pp == 1:
        _worker(0, 1, _free_port(), "_convert_hf_rank", kwargs)
    else:
        _run_in_world("_convert_hf_rank", tp * pp, **kwargs)
    return config_from_checkpoint(out_dir)


def _export_rank0(
    ckpt_dir: str, out_dir: str, progress: bool | None, mlm_config: dict | None = None
) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from megatron_agpo.models.build import build_model
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    if mlm_config is None:
        cfg = config_from_checkpoint(ckpt_dir)
        model = build_model(cfg)
        load_checkpoint(model, ckpt_dir)
    else:  # a Megatron-LM iteration folder: no manifest; the model part, every key present
        cfg = ModelConfig.from_dict(mlm_config)
        model = build_model(cfg)
        (chunk,) = _chunks(model)
        # Megatron-LM nests the model's state under "model", beside the run's other state.
        request = {"model": chunk.sharded_state_dict()}
        state = dist_load(request, Path(ckpt_dir), "model", extra_ok=True)["model"]
        with torch.no_grad():
            load_state_strict(chunk, state, Path(ckpt_dir))
    out = Path(out_dir)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not show)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files, weight_map = 0, [], {}

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    written = 0
    for hf_name, t in megatron_to_hf_tensors(model, cfg):
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > MAX_SHARD_BYTES:
            flush()
        shard[hf_name] = t.clone()  # own storage: safetensors refuses shared views
        shard_bytes += nbytes
        written += nbytes
        bar.update(nbytes)
    flush()
    bar.close()
    if len(files) == 1:
        (out / files[0]).rename(out / "model.safetensors")
    else:
        from megatron_agpo.models.weights import write_index

        for i, f in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            (out / f).rename(out / final)
            weight_map = {k: (final if v == f else v) for k, v in weight_map.items()}
        write_index(out, weight_map, written)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))


def _megatron_lm_model_config(iter_dir: Path, hf_config, tokenizer) -> dict:
    """ModelConfig (as a dict) of a Megatron-LM checkpoint: from hf_config (a config.json or
    its folder) when given, else from the checkpoint's saved arguments; the embedding is
    padded as Megatron-LM padded it."""
    vocab = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    if hf_config is not None:
        return ModelConfig.from_hf(hf_config).to_dict()
    a = megatron_lm_args(iter_dir)
    cfg = ModelConfig.from_hf(hf_config_from_megatron_lm_args(a, vocab))
    # Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP.
    cfg.make_vocab_size_divisible_by = int(a.get("make_vocab_size_divisible_by", 128)) * int(
        a.get("tensor_model_parallel_size", 1)
    )
    return cfg.to_dict()


def convert_megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    progress=None,
    hf_config: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """A checkpoint (a step folder, or a run folder meaning its latest complete checkpoint,
    or a Megatron-LM torch_dist checkpoint) -> HF folder (safetensors, config.json, tokenizer
    files). Loads the model at TP=1, PP=1 in one process (a fresh one when no process group
    exists) and streams it out tensor by tensor. Returns the checkpoint folder exported.

    For a Megatron-LM checkpoint the model config comes from hf_config (config.json) or the
    checkpoint's saved arguments, and the tokenizer files from `tokenizer` (a folder)."""
    mlm = megatron_lm_dir(ckpt_dir) if Path(ckpt_dir).is_dir() else None
    out_dir = Path(out_dir)
    mlm_config = None
    if mlm is not None:
        ckpt_dir = mlm
        mlm_config = _megatron_lm_model_config(mlm, hf_config, tokenizer)
    else:
        ckpt_dir = resolve_checkpoint(ckpt_dir)
        read_manifest(ckpt_dir)  # a clear error before any process starts
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        ckpt_dir=str(ckpt_dir), out_dir=str(out_dir), progress=progress, mlm_config=mlm_config
    )
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("convert_megatron_to_hf runs in a world of 1 process")
        _export_rank0(**kwargs)
    else:
        _worker(0, 1, _free_port(), "_export_rank0", kwargs)
    copy_tokenizer(Path(tokenizer) if tokenizer is not None else ckpt_dir, out_dir)
    return ckpt_dir
