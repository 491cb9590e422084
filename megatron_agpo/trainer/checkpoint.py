"""Run checkpoints: the model layer's format (megatron_agpo.models.checkpoint) plus what
training needs to continue exactly: the distributed optimizer, each rank's RNG, the data
position, the lr schedule and the step.

    step_NNNNNNN/model/              the model (any TP/PP/EP)
    step_NNNNNNN/optimizer/          Adam moments and fp32 main params in model space (megatron's
                                     `fully_reshardable` format: reshards to another TP/PP/DP/EP)
    step_NNNNNNN/rng/rank_NNNNN.pt   torch / python / model-parallel RNG of each rank
    step_NNNNNNN/trainer_state.json  step, weight version, data position, scheduler, Adam step
    + tokenizer files, manifest.json (HF config, layout, SHA-256 of every file), COMPLETE

Saving: every rank writes into a hidden temporary folder; rank 0 hashes and fsyncs every
file, writes the manifest and COMPLETE, and renames the folder into place; only then are old
checkpoints pruned (keep_last). Loading: rank 0 checks every file against the manifest
first, then the layout is compared (a different TP/PP/DP/EP is resharded by megatron's dist
checkpointing), then model and optimizer load with every key checked both ways.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_agpo.models.checkpoint import (
    COMPLETE,
    MODEL_SUBDIR,
    PREFIX,
    TMP_PREFIX,
    CheckpointError,
    broadcast_error,
    clean_partial,
    complete_checkpoints,
    copy_tokenizer,
    dist_load,
    finalize,
    latest,
    layout_str,
    load_state_strict,
    model_fields,
    no_orphan_writers,
    parallel_layout,
    prepare_tmp,
    publish,
    resolve_checkpoint,
    save_model_shards,
    step_dir,
    verify,
    verify_collective,
)
from megatron_agpo.parallel import barrier, global_rank
from megatron_agpo.trainer.preemption import (
    EXIT_PREEMPTED,
    Preempted,
    Preemption,
    die_with_parent,
    job_end_time,
)

OPTIMIZER_SUBDIR = "optimizer"
RNG_SUBDIR = "rng"
TRAINER_STATE = "trainer_state.json"
# megatron's model-space optimizer format: each parameter's Adam state in the parameter's own
# shape, so it reshards like the model does.
OPTIMIZER_FORMAT = "fully_reshardable"

__all__ = [
    "COMPLETE",
    "EXIT_PREEMPTED",
    "Preempted",
    "install_preemption",
    "repair_metrics",
    "resume",
    "PREFIX",
    "CheckpointError",
    "clean_partial",
    "complete_checkpoints",
    "latest",
    "load",
    "prune",
    "save",
    "step_dir",
    "verify",
]


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / RNG_SUBDIR / f"rank_{rank:05d}.pt"


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict, tracker: bool) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _inner(optimizer) -> list:
    """megatron's per-buffer DistributedOptimizers inside a ChainedOptimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _inner_torch(optimizer) -> list:
    return [o.optimizer for o in _inner(optimizer)]


def _adam_step(optimizer) -> float:
    """torch Adam's step count (the same for every parameter); 0 before the first step."""
    steps = {
        float(st["step"])
        for o in _inner_torch(optimizer)
        for st in o.state.values()
        if "step" in st
    }
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the Adam step: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _set_adam_step(optimizer, step: float) -> None:
    # megatron 0.16.1 (torch Adam, no Apex/TE) gives every parameter one shared `step` tensor
    # on load, which torch then increments once per parameter: one tensor each.
    for o in _inner_torch(optimizer):
        if not isinstance(o, torch.optim.Adam | torch.optim.AdamW):
            continue  # Apex/TE FusedAdam keep the step in their param groups
        for st in o.state.values():
            st["step"] = torch.tensor(float(step))


def _init_optimizer_state(optimizer) -> None:
    """Give every parameter an (empty) Adam state before loading into it: megatron's
    distributed optimizer builds its sharded state dict from that state (and reads `step`)."""
    for inner in _inner_torch(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
                        st["step"] = torch.zeros((), dtype=torch.float32)


def _cpu_gloo_groups(optimizer) -> None:
    # The model-space format gathers a buffer's shards over the DP group; without CUDA, the
    # project's process groups are gloo already and megatron creates no separate gloo groups
    # (parallel.py), so the DP group serves as its "gloo" group.
    for o in _inner(optimizer):
        if getattr(o, "data_parallel_group_gloo", None) is None and hasattr(
            o, "data_parallel_group"
        ):
            o.data_parallel_group_gloo = o.data_parallel_group


def _optimizer_sharded_state(model_sd: dict, optimizer, is_loading: bool) -> dict:
    _cpu_gloo_groups(optimizer)
    return optimizer.sharded_state_dict(
        model_sd,
        is_loading=is_loading,
        metadata={
            "distrib_optim_sharding_type": OPTIMIZER_FORMAT,
            # Gather over the gloo group onto DP rank 0: no `.cuda()` copies (CPU runs) and
            # one full copy of the state at a time.
            "distrib_optim_fully_reshardable_mem_efficient": True,
            # An MoE model at EP > 1 has two optimizers (dense parameters over DP, experts
            # over expert-DP), at EP = 1 one (megatron marks experts expert-parallel only when
            # EP > 1): without the "chained_<i>." key prefix (Megatron-LM's default too) the
            # keys are the model's, so the state reshards between EP sizes. A dense model has
            # one optimizer either way (no prefix: its keys are unchanged).
            "chained_optim_avoid_prefix": True,
        },
    )


_GROUP_KEYS = ("wd_mult", "lr_mult", "is_decoupled_lr")


def _fit_optimizer_state(loaded: dict, optimizer) -> dict:
    """The loaded optimizer state in the nesting this run's optimizer expects.

    The tensors (each parameter's Adam state in model space) come back where this run's
    request put them, but megatron's non-tensor part (each inner optimizer's param groups:
    lr, betas, eps, step, and `is_expert_parallel`, by which a group is matched on load) comes
    from the checkpoint's common state in the nesting it was saved with: one optimizer (a
    dense model, or an MoE model at EP = 1) or one per buffer kind ({0: dense, 1: experts} at
    EP > 1). When the two differ (an MoE checkpoint resharded between EP = 1 and EP > 1) each
    inner optimizer of this run gets the saved groups of the same (wd_mult, lr_mult,
    is_decoupled_lr), marked with its own `is_expert_parallel`."""
    inner = _inner(optimizer)
    parts = {k: v for k, v in loaded.items() if isinstance(k, int)}
    saved_chained = any(isinstance(v, dict) and "optimizer" in v for v in parts.values())
    if saved_chained == (len(inner) > 1):
        return loaded
    common = [loaded] if not saved_chained else [parts[k] for k in sorted(parts)]
    saved_groups = [g for c in common for g in c["optimizer"]["param_groups"]]
    sharding = common[0]["param_state_sharding_type"]
    extra = {k: v for k, v in common[0]["optimizer"].items() if k != "param_groups"}
    out = {}
    for i, o in enumerate(inner):
        groups = []
        for g in o.optimizer.param_groups:
            want = tuple(g.get(k) for k in _GROUP_KEYS)
            match = [s for s in saved_groups if tuple(s.get(k) for k in _GROUP_KEYS) == want]
            if not match:
                raise CheckpointError(
                    f"the checkpoint's optimizer has no parameter group with "
                    f"{dict(zip(_GROUP_KEYS, want, strict=True))}"
                )
            groups.append({**match[0], "is_expert_parallel": g["is_expert_parallel"]})
        tensors = loaded[i]["param_state"] if len(inner) > 1 else loaded["param_state"]
        out[i] = {"optimizer": {**extra, "param_groups": groups}, "param_state": tensors,
                  "param_state_sharding_type": sharding}  # fmt: skip
    return out if len(inner) > 1 else out[0]


def _model(model):
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- save
def save(
    root: Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict,
    keep_last: int,
    mcfg=None,
    hf_dir: Path | None = None,
) -> Path:
    """Collective. Writes root/step_NNNNNNN (atomically; replacing one of the same step
    without a moment where none is complete), then prunes to keep_last complete ones. A disk
    without room for it is named before anything is written (or when a write fails), with
    the folder and the bytes needed."""
    from torch.distributed.checkpoint.api import CheckpointException

    final = step_dir(root, step)
    if global_rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
    need = _bytes_to_write(model, optimizer)
    check_space(Path(root), final, need)
    try:
        return _save(final, root, step, model, optimizer, trainer_state, keep_last, mcfg, hf_dir)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch's is a BaseException
        if not _disk_full(e):
            raise
        shutil.rmtree(final.with_name(TMP_PREFIX + final.name), ignore_errors=True)
        free = shutil.disk_usage(root).free
        raise CheckpointError(
            f"no space left on device: saving {final} needs about {_human(need)} "
            f"({need} bytes) in {root}, which has {_human(free)} free; the partial save was "
            "removed. Free space, lower checkpoint.keep_last, or point logging.run_dir at a "
            "larger disk"
        ) from None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _bytes_to_write(model, optimizer) -> int:
    """About how many bytes a checkpoint of this model and optimizer takes, all ranks
    together: the model's parameters, the optimizer's main parameters and its state."""
    n = sum(p.numel() * p.element_size() for p in _model(model).parameters())
    for o in _inner_torch(optimizer):
        for group in o.param_groups:
            n += sum(p.numel() * p.element_size() for p in group["params"])
        for st in o.state.values():
            n += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    total = torch.tensor([float(n)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "nccl":
        dist.all_reduce(total)
    elif dist.is_initialized() and dist.get_world_size() > 1:
        total = total.cuda()
        dist.all_reduce(total)
    return int(total.item())


def check_space(root: Path, final: Path, need: int) -> None:
    """Collective: refuse a save the disk has no room for (rank 0 looks, every rank gets the
    verdict), naming the folder and the bytes."""
    err = None
    if global_rank() == 0:
        free = shutil.disk_usage(root).free
        if free < need:
            err = (
                f"no space left on device: saving {final} needs about {_human(need)} "
                f"({need} bytes) in {root}, which has {_human(free)} free. Free space, lower "
                "checkpoint.keep_last, or point logging.run_dir at a larger disk"
            )
    broadcast_error(err)


def _disk_full(e: BaseException) -> bool:
    """Whether a save failed for want of space: ENOSPC/EDQUOT anywhere in the chain, or the
    symptom torch's zip writer reports for a short write ("unexpected pos")."""
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(x)
        if "No space left on device" in text or "unexpected pos" in text:
            return True
        todo += [x.__cause__, x.__context__]
        todo += [f[0] for f in getattr(x, "failures", {}).values() if isinstance(f, tuple)]
    return False


def _save(final, root, step, model, optimizer, trainer_state, keep_last, mcfg, hf_dir) -> Path:
    from megatron.core import dist_checkpointing

    tmp = prepare_tmp(final)
    model_sd = _model(model).sharded_state_dict()
    save_model_shards(model, tmp / MODEL_SUBDIR)
    if global_rank() == 0:
        (tmp / OPTIMIZER_SUBDIR).mkdir()
        (tmp / RNG_SUBDIR).mkdir()
    barrier()
    opt_sd = _optimizer_sharded_state(model_sd, optimizer, is_loading=False)
    with no_orphan_writers():
        dist_checkpointing.save(opt_sd, str(tmp / OPTIMIZER_SUBDIR))
    torch.save(_rng_state(), _rng_file(tmp, global_rank()))
    adam_step = _adam_step(optimizer)
    barrier()
    if global_rank() == 0:
        state = {**trainer_state, "adam_step": adam_step}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        fields = {"kind": "run", "step": step, "optimizer_format": OPTIMIZER_FORMAT}
        if hf_dir is not None:
            fields["source"] = str(hf_dir)  # the HF folder training started from
        if mcfg is not None:
            tok = copy_tokenizer(Path(hf_dir), tmp) if hf_dir else []
            fields.update(model_fields(mcfg, hf_dir, tok))
        else:
            fields["layout"] = parallel_layout()
        finalize(tmp, fields)
        publish(tmp, final)
        prune(Path(root), keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest keep_last complete checkpoints (0: keep all)."""
    done = complete_checkpoints(root)
    old = done[:-keep_last] if keep_last > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


# ----------------------------------------------------------------------------- load
def check_layout(path: Path, manifest: dict, mcfg=None) -> bool:
    """Whether the checkpoint's layout differs from this run's; raises when the checkpoint
    cannot be loaded here (another model, or a layout the model cannot be split into)."""
    saved, now = manifest.get("layout", {}), parallel_layout()
    keys = ("tensor_parallel", "pipeline_parallel", "data_parallel")
    changed = any(saved.get(k) != now[k] for k in keys)
    # A layout written before expert parallelism was recorded had EP = 1.
    changed |= saved.get("expert_parallel", 1) != now["expert_parallel"]
    if mcfg is not None and manifest.get("model_config") is not None:
        from megatron_agpo.models.config import ModelConfig

        theirs = ModelConfig.from_dict(manifest["model_config"])
        diff = {
            k: (v, getattr(mcfg, k))
            for k, v in theirs.to_dict().items()
            if k in ("num_layers", "hidden_size", "vocab_size", "num_attention_heads",
                     "num_query_groups", "ffn_hidden_size", "architecture", "num_experts",
                     "moe_ffn_hidden_size", "moe_router_topk")
            and v != getattr(mcfg, k)
        }  # fmt: skip
        if diff:
            fields = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{path} is a checkpoint of another model ({fields})")
        if changed:
            try:
                theirs.validate(now["tensor_parallel"], now["pipeline_parallel"],
                                expert_parallel=now["expert_parallel"])  # fmt: skip
            except ValueError as e:
                raise CheckpointError(
                    f"{path} was written at {layout_str(saved)} and cannot be resharded to "
                    f"this run's {layout_str(now)}: {e}"
                ) from None
    if changed and manifest.get("optimizer_format") != OPTIMIZER_FORMAT:
        raise CheckpointError(
            f"{path} was written at {layout_str(saved)} with optimizer format "
            f"{manifest.get('optimizer_format')!r}, which reshards to no other layout; this "
            f"run is {layout_str(now)}"
        )
    return changed


def load(path: Path, model, optimizer, mcfg=None, log=print) -> dict:
    """Collective. Verifies every file, then restores model, optimizer and (same layout) this
    rank's RNG; returns the trainer state. Raises CheckpointError naming the file or the
    layouts before anything is loaded when the checkpoint is bad or does not fit."""
    path = Path(path)
    manifest = verify_collective(path)
    if manifest.get("kind") != "run":
        raise CheckpointError(
            f"{path} is a model-only checkpoint (no optimizer or trainer state); to train from "
            "its weights, export it (tools/convert_megatron_to_hf.py) and set model.hf_path"
        )
    changed = check_layout(path, manifest, mcfg)
    if changed and global_rank() == 0:
        log(
            f"resharding {path}: written at {layout_str(manifest['layout'])}, loading at "
            f"{layout_str(parallel_layout())}"
        )
    _init_optimizer_state(optimizer)
    module = _model(model)
    model_sd = module.sharded_state_dict()
    opt_sd = _optimizer_sharded_state(model_sd, optimizer, is_loading=True)
    state = dist_load(model_sd, path / MODEL_SUBDIR, "model")
    with torch.no_grad():
        load_state_strict(module, state, path / MODEL_SUBDIR)
    opt_state = _fit_optimizer_state(
        dist_load(opt_sd, path / OPTIMIZER_SUBDIR, "optimizer"), optimizer
    )
    # megatron 0.16.1 without Apex/TE: load_state_dict puts a `step` into every parameter's
    # state and then copies the loaded tensors over all state keys, where the model-space
    # format has no `step` (it skips it): hand it one, then set the real step below.
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    for o in _inner(optimizer) if not distrib_optimizer.HAVE_APEX_OR_TE else []:
        orig = o._set_main_param_and_optimizer_states
        o._set_main_param_and_optimizer_states = lambda p, t, f=orig: f(
            p, {**t, "step": torch.zeros(())}
        )
        patched.append(o)
    try:
        with torch.no_grad():  # the optimizer copies into views of leaf parameters
            optimizer.load_state_dict(opt_state)
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    _set_adam_step(optimizer, trainer_state.get("adam_step", 0.0))
    rng_file = _rng_file(path, global_rank())
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        # The model-parallel tracker's states belong to a TP/PP position: only restored at
        # the same layout (they seed dropout, which these models do not use).
        _set_rng_state(rng, tracker=not changed)
    elif not changed:
        raise CheckpointError(f"{rng_file} is missing from a checkpoint of this run's layout")
    return trainer_state


# ----------------------------------------------------------------------------- preemption
def install_preemption(section) -> Preemption:
    """The run's preemption handlers (SIGTERM/SIGUSR1, the job-end guard) from its
    CheckpointSection; under torchrun the rank also dies with torchrun (no orphans)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    p = Preemption(
        end_time=job_end_time(section.end_time), margin_s=float(section.save_before_end_s)
    )
    p.install()
    return p


# ----------------------------------------------------------------------------- resume
def resume(
    root: Path, how: str, fallback: bool, model, optimizer, mcfg=None, log=print
) -> tuple[Path, dict] | None:
    """Collective. checkpoint.resume: `auto` (the newest complete checkpoint under root, if
    any), `none`, or a path (a step folder or a run folder). With fallback (auto only), a
    checkpoint that fails its checks is reported loudly and the next older one is tried.
    Returns (path, trainer state), or None when starting afresh."""
    clean_partial(root)
    if how == "none":
        return None
    if how == "auto":
        candidates = list(reversed(complete_checkpoints(root)))
    else:
        candidates = [resolve_checkpoint(how)]
    for i, path in enumerate(candidates):
        try:
            return path, load(path, model, optimizer, mcfg, log)
        except CheckpointError as e:
            older = candidates[i + 1] if i + 1 < len(candidates) else None
            if how != "auto" or not fallback or older is None:
                raise
            if global_rank() == 0:
                log(
                    f"WARNING: checkpoint {path} is unusable: {e}\n"
                    f"WARNING: checkpoint.resume_fallback=true: falling back to {older}; the "
                    f"steps after {older.name} will be trained again"
                )
    return None


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def repair_metrics(path: Path) -> int:
    """Cut a torn last line (a run killed mid-write) from a JSONL file; a bad line elsewhere
    is an error naming it. Returns the number of lines cut (0 or 1)."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_bytes().split(b"\n")
    filled = [i for i, line in enumerate(lines) if line.strip()]
    bad = [i for i in filled if not _is_json(lines[i])]
    if not bad:
        return 0
    if bad != [filled[-1]]:
        raise CheckpointError(
            f"{path} line {bad[0] + 1} is not JSON and is not the last line: the file was "
            "edited or corrupted; fix or remove that line"
        )
    kept = b"\n".join(lines[: bad[0]]).rstrip(b"\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(kept + b"\n" if kept else b"")
    os.replace(tmp, path)
    return 1
