"""megatron-core distributed checkpoints of policy models, and HF <-> Megatron conversion.

Layout of a checkpoint folder:
    model/            dist_checkpointing (torch_dist) shards; loadable at any TP/PP
    manifest.json     ModelConfig, the source config.json, the TP/PP it was written at
    tokenizer files   copied from the HF folder (tokenizer.json, tokenizer_config.json, ...)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_agpo.models.config import ModelConfig
from megatron_agpo.models.weights import HFWeights, megatron_to_hf_tensors

MANIFEST = "manifest.json"
MODEL_SUBDIR = "model"
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def config_from_checkpoint(ckpt_dir: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_manifest(ckpt_dir)["model_config"])


def _chunks(model):
    from megatron_agpo.models.weights import _unwrap

    return _unwrap(model)


def save_checkpoint(
    model, ckpt_dir: str | Path, cfg: ModelConfig, extra: dict[str, Any] | None = None
) -> None:
    """Collective: every rank saves its shards into ckpt_dir/model; rank 0 writes the
    manifest. ckpt_dir/model must not exist yet or be empty."""
    from megatron.core import dist_checkpointing, parallel_state

    ckpt_dir = Path(ckpt_dir)
    model_dir = ckpt_dir / MODEL_SUBDIR
    if _rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    (chunk,) = _chunks(model)  # one model chunk per rank (no virtual pipeline stages)
    dist_checkpointing.save(chunk.sharded_state_dict(), str(model_dir))
    if _rank() == 0:
        manifest = {
            "format": "megatron_agpo/dist_checkpointing-v1",
            "model_config": cfg.to_dict(),
            "saved_at": {
                "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
            },
            **(extra or {}),
        }
        (ckpt_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(model, ckpt_dir: str | Path) -> None:
    """Collective: load ckpt_dir into this rank's shard, whatever TP/PP it was saved at."""
    from megatron.core import dist_checkpointing

    (chunk,) = _chunks(model)
    state = dist_checkpointing.load(chunk.sharded_state_dict(), str(Path(ckpt_dir) / MODEL_SUBDIR))
    chunk.load_state_dict(state, strict=False)
    missing = [n for n, _ in chunk.named_parameters() if n not in state]
    if missing:
        raise KeyError(f"checkpoint {ckpt_dir} lacks parameters: {missing[:5]}")


# ----------------------------------------------------------------------------- conversion
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn_name: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    try:
        globals()[fn_name](**kwargs)
    finally:
        from megatron_agpo.parallel import destroy_parallel

        destroy_parallel()


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
    src = json.loads((Path(hf_dir) / "config.json").read_text())
    save_checkpoint(model, out_dir, cfg, extra={"source_config": src, "source": str(hf_dir)})


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1):
    """HF folder -> megatron dist checkpoint written by tp*pp ranks (spawned here on CPU when
    no process group exists; collective when one does). Returns the ModelConfig."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = ModelConfig.from_hf(hf_dir)
    cfg.validate(tensor_parallel=tp, pipeline_parallel=pp)  # fail before spawning anything
    if (out_dir / MODEL_SUBDIR).exists() and any((out_dir / MODEL_SUBDIR).iterdir()):
        raise FileExistsError(f"{out_dir / MODEL_SUBDIR} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(hf_dir=str(hf_dir), out_dir=str(out_dir), tp=tp, pp=pp)
    if dist.is_initialized():
        _convert_hf_rank(**kwargs)
    elif tp * pp == 1:
        _worker(0, 1, _free_port(), "_convert_hf_rank", kwargs)
    else:
        _run_in_world("_convert_hf_rank", tp * pp, **kwargs)
    if _rank() == 0:
        copy_tokenizer(hf_dir, out_dir)
    return config_from_checkpoint(out_dir)


def _export_rank0(ckpt_dir: str, out_dir: str, progress: bool | None) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from megatron_agpo.models.build import build_model
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    cfg = config_from_checkpoint(ckpt_dir)
    model = build_model(cfg)
    load_checkpoint(model, ckpt_dir)
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


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, progress=None) -> Path:
    """Megatron dist checkpoint -> HF folder (safetensors, config.json, tokenizer files).
    Loads the model at TP=1, PP=1 in one process (a fresh one when no process group exists)
    and streams it out tensor by tensor."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(ckpt_dir=str(ckpt_dir), out_dir=str(out_dir), progress=progress)
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("convert_megatron_to_hf runs in a world of 1 process")
        _export_rank0(**kwargs)
    else:
        _worker(0, 1, _free_port(), "_export_rank0", kwargs)
    copy_tokenizer(ckpt_dir, out_dir)
    return out_dir
