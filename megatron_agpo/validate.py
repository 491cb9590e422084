"""Checks of a whole run configuration, done once by the launcher before any rank starts.

`preflight(cfg)` returns every problem, one line each, naming the key (and for data, the file,
row and line): the pure range and choice checks of `TrainConfig.problems()`, then the ones that
read local files: the model folder and its config.json against the parallel layout, the data
file (every row parsed, encoding included) against the held-out split, a resume path.

Nothing here goes to the network: a `model.hf_path` that is not an existing local folder is an
error (a hub id is never looked up; download the model first), and the model is read from its
config.json only (no torch model, no tokenizer load).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from megatron_agpo.trainer.config import TrainConfig

# "org/name" or "name": what a hub id looks like (a local path that does not exist may too).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def preflight(cfg: TrainConfig, world_size: int | None = None) -> list[str]:
    """Every problem with `cfg`, one line each; empty when the run may start. `world_size`:
    the processes the run will have (`cfg.nproc` when `agpo-train` starts them)."""
    problems = cfg.problems()
    p = cfg.parallel
    mp = p.tensor_parallel * p.pipeline_parallel
    if world_size is not None and mp >= 1 and world_size >= 1 and world_size % mp:
        what = "nproc" if world_size == cfg.nproc else "the world size"
        problems.append(
            f"{what}={world_size} is not divisible by parallel.tensor_parallel x "
            f"pipeline_parallel = {p.tensor_parallel} x {p.pipeline_parallel}"
        )
    problems += model_problems(cfg)
    problems += data_problems(cfg)
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        problems.append(
            "logging.wandb=true: the wandb package is not installed (pip install wandb)"
        )
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).expanduser().is_dir():
        problems.append(
            f"checkpoint.resume={resume!r}: no such folder (auto, none, or a checkpoint folder)"
        )
    return problems


def model_folder_problem(key: str, value: str) -> str | None:
    """Why `value` (the setting `key`) is not a local HF model folder; None when it is."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{key}={value!r}: no config.json in that folder (not an HF model folder)"
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            return f"{key}={value!r}: no tokenizer in that folder (looked for {_TOKENIZER_FILES})"
        return None
    if path.exists():
        return f"{key}={value!r}: not a folder (give the HF model folder, not a file in it)"
    if not value.startswith((".", "/", "~")) and _HUB_ID.match(value):
        return (
            f"{key}={value!r}: no such local folder; hub ids are not downloaded at launch "
            f"(download it first, e.g. `hf download {value} --local-dir DIR`, then "
            f"{key}=DIR)"
        )
    return f"{key}={value!r}: no such folder"


def model_problems(cfg: TrainConfig) -> list[str]:
    """The policy (and a KL reference) folder: present, an HF model, and divisible by the
    parallel layout."""
    from megatron_agpo.models.config import ModelConfig

    out: list[str] = []
    keys = [("model.hf_path", cfg.model.hf_path)]
    if cfg.algorithm.loss.kl_coef != 0.0 and cfg.model.reference_hf_path:
        keys.append(("model.reference_hf_path", cfg.model.reference_hf_path))
    p = cfg.parallel
    for key, value in keys:
        if not value:
            continue
        problem = model_folder_problem(key, value)
        if problem:
            out.append(problem)
            continue
        try:
            mc = ModelConfig.from_hf(Path(value).expanduser())
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            out.append(f"{key}={value!r}: config.json: {_one_line(e)}")
            continue
        if p.tensor_parallel >= 1 and p.pipeline_parallel >= 1:
            try:
                mc.validate(p.tensor_parallel, p.pipeline_parallel)
            except ValueError as e:
                out.append(
                    f"parallel.tensor_parallel={p.tensor_parallel}, parallel.pipeline_parallel="
                    f"{p.pipeline_parallel} do not fit {key}: {_one_line(e)}"
                )
        if key == "model.hf_path":  # experts over EP, router replay (models/moe.py)
            from megatron_agpo.models.moe import moe_problems

            out += moe_problems(mc, key, p.expert_parallel, cfg.model.router_replay)
        if key == "model.hf_path" and cfg.rollout.engine.max_model_len > mc.max_position_embeddings:
            out.append(
                f"rollout.engine.max_model_len={cfg.rollout.engine.max_model_len} exceeds the "
                f"model's context (max_position_embeddings={mc.max_position_embeddings})"
            )
    return out


def data_problems(cfg: TrainConfig) -> list[str]:
    """The prompt file: present, every row valid (made chats by data.prompt, as the trainer
    loads it), more rows than the held-out split."""
    from megatron_agpo.data.loaders import ROW_FORMATS
    from megatron_agpo.data.tasks import file_examples

    d = cfg.data
    if d.kind != "math_jsonl" or not d.path:
        return []
    if d.format not in ROW_FORMATS or d.prompt.problems("data.prompt."):
        return []  # reported by DataSection.problems; the rows cannot be read without them
    path = Path(d.path).expanduser()
    if not path.is_file():
        return [f"data.path={d.path!r}: no such file"]
    try:
        file_examples(d)
    except ValueError as e:  # DataValidationError names file, row and line
        msg = f"data.path: {_one_line(e)}"
        if d.format == "problem" and "missing field" in msg:
            msg += (
                f" (the fields read are data.prompt.problem_key={d.prompt.problem_key!r} and "
                f"data.prompt.answer_key={d.prompt.answer_key!r})"
            )
        return [msg]
    return []


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
