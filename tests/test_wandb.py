"""The optional Weights & Biases logger, run offline and checked by reading the run's own
files back (the .wandb record log W&B would upload with `wandb sync`)."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest

from megatron_agpo.trainer.metrics import MetricsWriter, WandbSettings, wandb_mode, wandb_settings

wandb = pytest.importorskip("wandb")


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte W&B header, then LevelDB's log format
    (32 KiB blocks; records of crc32, length, type, with FIRST/MIDDLE/LAST fragments)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += room
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def finished_records(run_file: Path, timeout_s: float = 30.0) -> list:
    """The records once the run's `exit` record is on disk: W&B's service process may still
    be writing the file for a moment after `run.finish()` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_file}: no exit record after {timeout_s} s")
        time.sleep(0.2)


def history_and_config(run_file: Path) -> tuple[list[dict], dict, str]:
    history, config, run_id = [], {}, ""
    for r in finished_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            # A key arrives in `key` or, in newer writers, as a one-element `nested_key`.
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            history.append({k: v for k, v in row.items() if not k.startswith("_") or k == "_step"})
        elif kind == "run":
            run_id = r.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return history, config, run_id


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def test_mode_falls_back_to_offline_without_key_or_network():
    never = lambda url: pytest.fail("no probe without a key")  # noqa: E731
    assert wandb_mode("auto", {"NETRC": "/nonexistent"}, probe=never)[0] == "offline"
    key = {"WANDB_API_KEY": "x"}
    assert wandb_mode("auto", key, probe=lambda url: False) == (
        "offline",
        "https://api.wandb.ai is not reachable",
    )
    assert wandb_mode("auto", key, probe=lambda url: True)[0] == "online"
    assert wandb_mode("online", {}, probe=never)[0] == "online"
    assert wandb_mode("auto", {"WANDB_MODE": "offline", **key}, probe=never)[0] == "offline"


@pytest.mark.dist  # W&B starts its service process
def test_offline_run_files_hold_what_was_logged(tmp_path, offline_env, capsys):
    run_dir = tmp_path / "run"
    settings = WandbSettings(project="agpo-test", mode="auto", config={"algorithm": "agpo"})
    w = MetricsWriter(run_dir, tensorboard=False, total_steps=3, progress=False, wandb=settings)
    rows = [
        {"step": 1, "loss": 0.5, "reward/mean": 0.25, "note": "text is skipped"},
        {"step": 2, "loss": float("nan"), "reward/mean": 0.5},  # non-finite: not logged
        {"step": 3, "loss": -0.125, "reward/mean": 0.75, "groups/kept": 16},
    ]
    for r in rows:
        w.log(r)
    w.close()
    assert "wandb: offline (no W&B API key" in capsys.readouterr().out
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, config, run_id = history_and_config(run_file)
    expected = [
        {k: v for k, v in r.items() if isinstance(v, int | float) and math.isfinite(v)}
        for r in rows
    ]
    assert [
        {**{k: v for k, v in h.items() if k != "_step"}, "step": h["_step"]} for h in history
    ] == [e for e in expected]
    assert config["algorithm"] == "agpo"
    assert run_id == (run_dir / "wandb_run_id").read_text()
    # The JSONL beside it is unchanged by the W&B logger.
    assert [
        json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ] == [
        1,
        2,
        3,
    ]
    # A resumed run directory continues the same W&B run id.
    w2 = MetricsWriter(
        run_dir, tensorboard=False, total_steps=5, progress=False, start_step=3, wandb=settings
    )
    w2.log({"step": 4, "loss": 0.0})
    w2.close()
    runs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert {p.stem for p in runs} == {f"run-{run_id}"} and len(runs) == 2


def test_settings_from_the_train_config():
    from megatron_agpo.trainer.compose import load_config

    assert wandb_settings(load_config([])) is None
    s = wandb_settings(
        load_config(["logging.wandb=true", "logging.run_dir=runs/x", "logging.wandb_mode=offline"])
    )
    assert (s.project, s.mode, s.name) == ("megatron-agpo", "offline", "x")
    assert s.config["trainer"]["steps"] == 60


@pytest.mark.dist  # W&B starts its service process
def test_trainer_config_turns_it_on(tmp_path, offline_env):
    """The trainer records its config in run_dir/config.json before its first row; with
    logging.wandb=true there, the first row starts the W&B run."""
    import dataclasses

    from megatron_agpo.trainer.compose import load_config

    for on in (False, True):
        run_dir = tmp_path / f"run-{on}"
        run_dir.mkdir()
        cfg = load_config([f"logging.wandb={str(on).lower()}", f"logging.run_dir={run_dir}"])
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        w = MetricsWriter(run_dir, tensorboard=False, total_steps=2, progress=False)
        w.log({"step": 1, "loss": 0.25})
        w.close()
        runs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(runs) == int(on)
        if on:
            history, config, _ = history_and_config(runs[0])
            assert history == [{"loss": 0.25, "_step": 1}]
            assert config["logging"]["wandb"] is True
