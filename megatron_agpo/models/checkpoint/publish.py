"""Publishing a checkpoint atomically: written into a hidden temporary folder beside its final
name, then renamed into place (an atomic swap when one exists already), and what an
interrupted save leaves behind cleaned up."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from megatron_agpo.models.checkpoint.layout import COMPLETE, OLD_PREFIX, TMP_PREFIX
from megatron_agpo.models.checkpoint.manifest import fsync_dir
from megatron_agpo.parallel import barrier, global_rank

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
            fsync_dir(final.parent)
            shutil.rmtree(tmp)  # now the old one
            return
        old = final.with_name(OLD_PREFIX + final.name)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
        return
    tmp.rename(final)
    fsync_dir(final.parent)


def clean_partial(root: Path) -> list[Path]:
    """Collective. Remove temporary folders of interrupted saves; put back a checkpoint moved
    aside by an interrupted re-save. Returns what was removed."""
    removed = []
    root = Path(root)
    if global_rank() == 0 and root.exists():
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
    barrier()
    return removed


def prepare_tmp(final: Path) -> Path:
    """Collective: a fresh empty temporary folder beside final."""
    tmp = final.with_name(TMP_PREFIX + final.name)
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return tmp
