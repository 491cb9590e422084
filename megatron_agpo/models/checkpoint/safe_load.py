"""Reading a dist checkpoint without running its code: torch's distributed-checkpoint metadata
through a restricted unpickler, every pickled item weights-only, and the load checked key by
key (see docs/CHECKPOINTS.md)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from megatron_agpo.models.checkpoint.errors import CheckpointError

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
