"""The checkpoint format: integrity checks (SHA-256 manifest, strict keys, the restricted
metadata unpickler), atomic publishing and pruning, resolving paths, torn metrics lines, and
resharding a TP=2 checkpoint (model and optimizer) to TP=1."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from megatron_agpo.models import checkpoint as fmt
from megatron_agpo.trainer import checkpoint as ck
from tests.dist_utils import run_distributed


# ----------------------------------------------------------------------------- helpers
def _fake_checkpoint(root: Path, step: int, payload: bytes = b"x" * 1000) -> Path:
    """A complete checkpoint folder with plain files (the format layer does not care what
    they hold)."""
    final = fmt.step_dir(root, step)
    tmp = final.with_name(fmt.TMP_PREFIX + final.name)
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "__0_0.distcp").write_bytes(payload)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    fmt.finalize(tmp, {"kind": "run", "step": step})
    root.mkdir(parents=True, exist_ok=True)
    fmt.publish(tmp, final)
    return final


class _Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- unit
def test_flipped_and_truncated_files_are_named(tmp_path):
    c = _fake_checkpoint(tmp_path, 5)
    assert fmt.verify(c)["step"] == 5
    shard = c / "model" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100:164] = bytes(b ^ 0xFF for b in data[100:164])  # 64 flipped bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(fmt.CheckpointError, match=r"__0_0\.distcp does not match its SHA-256"):
        fmt.verify(c)
    shard.write_bytes(bytes(data[:500]))
    with pytest.raises(fmt.CheckpointError, match=r"__0_0\.distcp is 500 bytes, the manifest"):
        fmt.verify(c)
    (c / "trainer_state.json").unlink()
    shard.write_bytes(b"x" * 1000)
    with pytest.raises(fmt.CheckpointError, match=r"trainer_state\.json is missing"):
        fmt.verify(c)
    (c / fmt.MANIFEST).write_text('{"format": ')
    with pytest.raises(fmt.CheckpointError, match=r"manifest\.json is corrupted"):
        fmt.verify(c)


def test_resave_swaps_atomically_and_prune_keeps_last(tmp_path):
    for s in (1, 2, 3):
        _fake_checkpoint(tmp_path, s)
    # Re-saving step 3 with other content: the old folder is replaced in one rename.
    _fake_checkpoint(tmp_path, 3, payload=b"y" * 10)
    assert (tmp_path / "step_0000003" / "model" / "__0_0.distcp").read_bytes() == b"y" * 10
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    assert [p.name for p in ck.prune(tmp_path, keep_last=2)] == ["step_0000001"]
    assert [p.name for p in fmt.complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    # An interrupted move-aside re-save (no renameat2): clean_partial puts the old one back.
    (tmp_path / "step_0000003").rename(tmp_path / ".old-step_0000003")
    (tmp_path / ".tmp-step_0000004").mkdir()
    fmt.clean_partial(tmp_path)
    assert fmt.latest(tmp_path).name == "step_0000003"
    assert not (tmp_path / ".tmp-step_0000004").exists()


def test_resolve_checkpoint_paths(tmp_path):
    run = tmp_path / "runs" / "x"
    _fake_checkpoint(run / "checkpoints", 2)
    _fake_checkpoint(run / "checkpoints", 10)
    (run / "checkpoints" / "step_0000020").mkdir()  # an interrupted save: no COMPLETE
    assert fmt.resolve_checkpoint(run).name == "step_0000010"
    assert fmt.resolve_checkpoint(run / "checkpoints").name == "step_0000010"
    step2 = run / "checkpoints" / "step_0000002"
    assert fmt.resolve_checkpoint(step2) == step2
    assert fmt.resolve_checkpoint(step2 / "model") == step2
    with pytest.raises(fmt.CheckpointError, match="holds no complete checkpoint"):
        fmt.resolve_checkpoint(run / "checkpoints" / "step_0000020")
    (tmp_path / "old" / "dist").mkdir(parents=True)
    with pytest.raises(fmt.CheckpointError, match="older megatron_agpo version"):
        fmt.resolve_checkpoint(tmp_path / "old" / "dist")
    with pytest.raises(fmt.CheckpointError, match="no such file"):
        fmt.resolve_checkpoint(tmp_path / "nowhere")


def test_crafted_metadata_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / ".metadata"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(evil.read_bytes())  # the control: a plain unpickler runs the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(fmt.CheckpointError, match=r"\.metadata was refused: global posix\.system"):
        fmt.read_dcp_metadata(evil)
    assert not marker.exists()


def test_torn_metrics_line_is_cut(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert ck.repair_metrics(m) == 1
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [0, 1]
    assert ck.repair_metrics(m) == 0
    m.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(fmt.CheckpointError, match=r"metrics\.jsonl line 2 is not JSON"):
        ck.repair_metrics(m)


def test_preemption_flag_and_deadline():
    import signal

    from megatron_agpo.trainer.preemption import Preemption, job_end_time

    p = Preemption(end_time=1000.0, margin_s=60.0)
    assert not p.deadline_near(step_seconds=10.0, now=900.0)  # 100 s left > 60 + 10
    assert p.deadline_near(step_seconds=50.0, now=900.0)  # 100 s left < 60 + 50
    assert job_end_time(5.0, {"SLURM_JOB_END_TIME": "1234"}) == 1234.0
    assert job_end_time(5.0, {}) == 5.0
    q = Preemption()
    q.install()
    try:
        assert not q.should_stop(0.0)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert q.should_stop(0.0) and q.reason.signal == signal.SIGUSR1 and q.reason.count == 2
    finally:
        q.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ----------------------------------------------------------------------------- dist
def _make(pc, hf):
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import OptimizerSettings, wrap_for_training

    model, mcfg = build_model_from_hf(hf)
    model, opt = wrap_for_training(model, pc, OptimizerSettings(lr=1e-2))
    return model, opt, mcfg


def _step(model, opt, seed):
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_agpo.models import forward_logits

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (4, 10), generator=g)
    model.zero_grad_buffer()
    opt.zero_grad()
    # A sum over this rank's vocab shard: the TP ranks' losses add up to the TP=1 loss (a mean
    # would double the gradient at TP=2).
    forward_logits(model, ids).pow(2).sum().div(5000).backward()
    finalize_model_grads([model])
    opt.step()


def _hf_tensors(model, mcfg) -> dict:
    from megatron_agpo.models import megatron_to_hf_tensors

    return {n: t.clone() for n, t in megatron_to_hf_tensors(model, mcfg)}


def _save_two_ranks(rank, world, hf, root, tp):
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    pc = ParallelConfig(tensor_parallel=tp)  # TP=2, or TP=1 and DP=2 (same batch on both)
    init_parallel(pc)
    model, opt, mcfg = _make(pc, hf)
    _step(model, opt, 0)
    _step(model, opt, 1)
    ck.save(Path(root), 2, model, opt, {"step": 2}, keep_last=2, mcfg=mcfg, hf_dir=hf)
    saved = _hf_tensors(model, mcfg)
    _step(model, opt, 2)
    after = _hf_tensors(model, mcfg)
    if rank == 0:
        torch.save({"saved": saved, "after": after}, Path(root) / "reference.pt")


def _resume_one_rank(rank, world, hf, root, written):
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    pc = ParallelConfig(tensor_parallel=1)
    init_parallel(pc)
    model, opt, mcfg = _make(pc, hf)
    logs = []
    state = ck.load(ck.latest(Path(root)), model, opt, mcfg, log=logs.append)
    assert state["step"] == 2 and state["adam_step"] == 2.0, state
    assert f"written at {written}, loading at TP=1 PP=1 DP=1" in logs[0], logs
    ref = torch.load(Path(root) / "reference.pt", weights_only=True)
    for name, t in _hf_tensors(model, mcfg).items():
        assert torch.equal(t, ref["saved"][name]), f"{name} changed in the resharding"
    # The next update equals the two-rank run's: Adam moments, step and lr came back
    # resharded (with fresh moments the update would be about lr * sign(g), far off).
    _step(model, opt, 2)
    for name, t in _hf_tensors(model, mcfg).items():
        torch.testing.assert_close(t, ref["after"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tiny")))


@pytest.mark.dist
@pytest.mark.parametrize(
    "tp, written", [(2, "TP=2 PP=1 DP=1"), (1, "TP=1 PP=1 DP=2")], ids=["tp2", "dp2"]
)
def test_two_rank_checkpoint_resumes_in_one_process(tiny_hf, tmp_path, tp, written):
    run_distributed(_save_two_ranks, 2, tiny_hf, str(tmp_path), tp)
    manifest = json.loads((tmp_path / "step_0000002" / fmt.MANIFEST).read_text())
    assert fmt.layout_str(manifest["layout"]) == written
    assert manifest["hf_config"]["architectures"] == ["LlamaForCausalLM"]
    assert "tokenizer.json" in manifest["tokenizer_files"]
    assert {"model/.metadata", "optimizer/.metadata", "rng/rank_00001.pt"} <= set(manifest["files"])
    run_distributed(_resume_one_rank, 1, tiny_hf, str(tmp_path), written)
    if tp == 2:  # and at PP=2: each stage loads its layers and their Adam state
        run_distributed(_load_pp2, 2, tiny_hf, str(tmp_path))


def _load_pp2(rank, world, hf, root):
    from megatron_agpo.models import gather_hf_tensors_to_rank0
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    pc = ParallelConfig(tensor_parallel=1, pipeline_parallel=2)
    init_parallel(pc)
    model, opt, mcfg = _make(pc, hf)
    state = ck.load(ck.latest(Path(root)), model, opt, mcfg, log=lambda m: None)
    assert state["step"] == 2
    got = {n: t.clone() for n, t in gather_hf_tensors_to_rank0(model, mcfg)}
    if rank == 0:
        ref = torch.load(Path(root) / "reference.pt", weights_only=True)["saved"]
        assert sorted(got) == sorted(ref)
        for name, t in got.items():
            assert torch.equal(t, ref[name]), f"{name} changed in the resharding to PP=2"


def _load_expect(rank, world, hf, path, pattern):
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    pc = ParallelConfig()
    init_parallel(pc)
    model, opt, mcfg = _make(pc, hf)
    with pytest.raises(fmt.CheckpointError, match=pattern):
        ck.load(Path(path), model, opt, mcfg)


def _save_tp1(rank, world, hf, root):
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    pc = ParallelConfig()
    init_parallel(pc)
    model, opt, mcfg = _make(pc, hf)
    _step(model, opt, 0)
    ck.save(Path(root), 1, model, opt, {"step": 1}, keep_last=2, mcfg=mcfg, hf_dir=hf)
    _step(model, opt, 1)
    ck.save(Path(root), 2, model, opt, {"step": 2}, keep_last=2, mcfg=mcfg, hf_dir=hf)


def _rehash(c: Path) -> None:
    """Make the manifest match the files again: an attacker can rewrite it too."""
    m = json.loads((c / fmt.MANIFEST).read_text())
    for rel in m["files"]:
        f = c / rel
        m["files"][rel] = {"bytes": f.stat().st_size, "sha256": fmt.sha256_file(f)}
    (c / fmt.MANIFEST).write_text(json.dumps(m))


@pytest.mark.dist
def test_bad_checkpoints_are_refused_naming_the_file(tiny_hf, tmp_path):
    run_distributed(_save_tp1, 1, tiny_hf, str(tmp_path))
    c = tmp_path / "step_0000002"
    pristine = {p: p.read_bytes() for p in c.rglob("*") if p.is_file()}

    def restore():
        for p, b in pristine.items():
            p.write_bytes(b)

    # 64 flipped bytes in an optimizer shard.
    shard = sorted((c / "optimizer").glob("*.distcp"))[0]
    data = bytearray(pristine[shard])
    data[-200:-136] = bytes(b ^ 0x55 for b in data[-200:-136])
    shard.write_bytes(bytes(data))
    run_distributed(_load_expect, 1, tiny_hf, str(c), rf"{shard.name} does not match its SHA")
    restore()
    # A crafted .metadata with a matching manifest: refused unexecuted.
    marker = tmp_path / "pwned"
    (c / "model" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rehash(c)
    run_distributed(_load_expect, 1, tiny_hf, str(c), r"model/\.metadata was refused")
    assert not marker.exists()
    restore()
    # A checkpoint written at another layout in a format that cannot reshard: both named.
    m = json.loads(pristine[c / fmt.MANIFEST])
    m["layout"]["tensor_parallel"], m["optimizer_format"] = 2, "dp_reshardable"
    (c / fmt.MANIFEST).write_text(json.dumps(m))
    run_distributed(
        _load_expect, 1, tiny_hf, str(c), r"written at TP=2 PP=1 DP=1 .* this run is TP=1 PP=1"
    )
    restore()
    # Strict keys: a model missing a parameter is refused with its name.
    run_distributed(_load_missing_key, 1, tiny_hf, str(c))
    # A truncated trainer state: named; resume=auto falls back to step 1 only when told to.
    (c / "trainer_state.json").write_bytes(pristine[c / "trainer_state.json"][:20])
    run_distributed(_resume_fallback, 1, tiny_hf, str(tmp_path))


def _resume_fallback(rank, world, hf, root):
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    pc = ParallelConfig()
    init_parallel(pc)
    model, opt, mcfg = _make(pc, hf)
    with pytest.raises(fmt.CheckpointError, match=r"trainer_state\.json is 20 bytes"):
        ck.resume(Path(root), "auto", False, model, opt, mcfg)
    logs = []
    path, state = ck.resume(Path(root), "auto", True, model, opt, mcfg, log=logs.append)
    assert path.name == "step_0000001" and state["step"] == 1
    assert logs[0].startswith("WARNING: checkpoint") and "falling back to" in logs[0], logs


def _load_missing_key(rank, world, hf, path):
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    pc = ParallelConfig()
    init_parallel(pc)
    model, opt, mcfg = _make(pc, hf)
    with pytest.raises(fmt.CheckpointError, match="unexpected keys .*final_layernorm"):
        fmt.load_state_strict(
            model.module,
            {k: v for k, v in model.module.state_dict().items()} | {"decoder.final_layernorm.x": 1},
            Path(path),
        )
    sd = {k: v for k, v in model.module.state_dict().items() if "final_layernorm" not in k}
    with pytest.raises(fmt.CheckpointError, match="missing keys .*decoder.final_layernorm.weight"):
        fmt.load_state_strict(model.module, sd, Path(path))


@pytest.mark.e2e
@pytest.mark.dist  # one gloo process per conversion
def test_crafted_metadata_does_not_run_in_the_export_tool(tiny_hf, tmp_path):
    import subprocess
    import sys

    fmt.convert_hf_to_megatron(tiny_hf, tmp_path / "ck")
    marker = tmp_path / "pwned"
    (tmp_path / "ck" / "model" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rehash(tmp_path / "ck")
    res = subprocess.run(
        [sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt", str(tmp_path / "ck"),
         "--out", str(tmp_path / "out")],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode != 0
    assert "model/.metadata was refused" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]  # one paragraph, no traceback
    assert not marker.exists()


def _verdicts(rank, world):
    # Rank 0's verdict reaches every rank as text (no pickling): a message with non-ASCII
    # characters, then none.
    msg = "checkpoint step_0000007/model/__1_0.distcp: SHA-256 mismatch (é)"
    with pytest.raises(fmt.CheckpointError) as e:
        fmt.broadcast_error(msg if rank == 0 else "ignored: only rank 0's counts")
    assert str(e.value) == msg
    fmt.broadcast_error(None if rank == 0 else "ignored")


@pytest.mark.dist
def test_rank0_verdict_reaches_every_rank():
    run_distributed(_verdicts, 2)
