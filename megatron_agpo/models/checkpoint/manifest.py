"""The manifest: what it records about the model, writing it with the size and SHA-256 of every
file (then the COMPLETE marker, all fsync'ed), reading it, and checking every file against
it before a load."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from megatron_agpo.models.checkpoint.errors import CheckpointError, broadcast_error
from megatron_agpo.models.checkpoint.layout import COMPLETE, FORMAT, MANIFEST, parallel_layout
from megatron_agpo.models.config import ModelConfig
from megatron_agpo.parallel import global_rank

_HASH_CHUNK = 8 * 1024**2


def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
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
        fsync_dir(d)
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
    if global_rank() == 0:
        try:
            verify(ckpt_dir, prefixes)
        except CheckpointError as e:
            err = str(e)
    broadcast_error(err)
    return read_manifest(ckpt_dir)


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
