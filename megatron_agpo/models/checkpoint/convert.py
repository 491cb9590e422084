"""HF <-> Megatron conversion: each direction runs in its own process group (spawned here on
CPU when none exists), HF folder -> checkpoint at any TP/PP (and EP for a mixture of
experts), and checkpoint (or a Megatron-LM one) -> HF safetensors streamed tensor by tensor."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_agpo.models.checkpoint.layout import COMPLETE, copy_tokenizer, resolve_checkpoint
from megatron_agpo.models.checkpoint.manifest import config_from_checkpoint, read_manifest
from megatron_agpo.models.checkpoint.megatron_lm import megatron_lm_dir, megatron_lm_model_config
from megatron_agpo.models.checkpoint.safe_load import dist_load, load_state_strict
from megatron_agpo.models.checkpoint.shards import load_checkpoint, model_chunks, save_checkpoint
from megatron_agpo.models.config import ModelConfig
from megatron_agpo.models.weights import HFWeights, megatron_to_hf_tensors
from megatron_agpo.parallel import free_port

# Shard size of exported safetensors files.
MAX_SHARD_BYTES = 2 * 1024**3
# Show a progress bar when a conversion moves more than this.
PROGRESS_MIN_BYTES = 256 * 1024**2


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
        _worker, args=(world, free_port(), fn_name, kwargs), nprocs=world, start_method="spawn"
    )


def _hf_dtype(hf: HFWeights) -> str:
    dt = hf.get("model.embed_tokens.weight").dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]


def _convert_hf_rank(hf_dir: str, out_dir: str, tp: int, pp: int, ep: int = 1) -> None:
    from megatron_agpo.models.build import build_model
    from megatron_agpo.models.weights import load_hf_weights
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    # (TP x EP trains only with sequence parallelism, which megatron's MoE layer checks in a
    # training forward; building and saving the weights need none.)
    init_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep))
    hf = HFWeights(hf_dir)
    # The stored tensors' dtype wins over config.json's (a GGUF export may say bfloat16 and
    # hold float32); keeping it is what makes the round trip bit-exact.
    cfg = ModelConfig.from_hf(hf_dir, params_dtype=_hf_dtype(hf))
    cfg.validate(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep)
    model = build_model(cfg)
    load_hf_weights(model, hf, cfg)
    save_checkpoint(model, out_dir, cfg, hf_dir=hf_dir, extra={"source": str(hf_dir)})


def conversion_world(tp: int = 1, pp: int = 1, ep: int = 1) -> int:
    """Ranks that write a checkpoint at TP=tp, PP=pp, EP=ep: PP stages of lcm(tp, ep) ranks
    (the dense part TP x DP, the experts EP x expert-DP over the same ranks)."""
    return pp * math.lcm(tp, ep)


def convert_hf_to_megatron(
    hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, ep: int = 1
):
    """HF folder -> megatron_agpo checkpoint written by conversion_world(tp, pp, ep) ranks
    (spawned here on CPU when no process group exists; collective in the caller's world when
    one does). ep: a mixture of experts' experts split over that many ranks, each writing its
    own (the checkpoint loads at any other EP). Returns the ModelConfig."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = ModelConfig.from_hf(hf_dir)
    if ep != 1 and not cfg.is_moe:
        raise ValueError(f"ep={ep} needs a mixture-of-experts model; {hf_dir} is "
                         f"{cfg.architecture}, a dense model")  # fmt: skip
    if ep < 1 or (cfg.is_moe and cfg.num_experts % ep):
        raise ValueError(f"ep={ep} does not divide the {cfg.num_experts} experts of {hf_dir}")
    # fail before spawning anything
    cfg.validate(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep)
    if (out_dir / COMPLETE).exists() or (out_dir.exists() and any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} is not empty")
    kwargs = dict(hf_dir=str(hf_dir), out_dir=str(out_dir), tp=tp, pp=pp, ep=ep)
    world = conversion_world(tp, pp, ep)
    if dist.is_initialized():  # the caller's world (the rest of it data-parallel replicas)
        _convert_hf_rank(**kwargs)
    elif world == 1:
        _worker(0, 1, free_port(), "_convert_hf_rank", kwargs)
    else:
        _run_in_world("_convert_hf_rank", world, **kwargs)
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
        (chunk,) = model_chunks(model)
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
    exists) and streams it out tensor by tensor (a mixture of experts loads whole, whatever EP
    it was saved at). Returns the checkpoint folder exported.

    For a Megatron-LM checkpoint the model config comes from hf_config (config.json) or the
    checkpoint's saved arguments, and the tokenizer files from `tokenizer` (a folder)."""
    mlm = megatron_lm_dir(ckpt_dir) if Path(ckpt_dir).is_dir() else None
    out_dir = Path(out_dir)
    mlm_config = None
    if mlm is not None:
        ckpt_dir = mlm
        mlm_config = megatron_lm_model_config(mlm, hf_config, tokenizer)
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
        _worker(0, 1, free_port(), "_export_rank0", kwargs)
    copy_tokenizer(Path(tokenizer) if tokenizer is not None else ckpt_dir, out_dir)
    return ckpt_dir
