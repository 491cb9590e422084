"""Qwen3-MoE checkpoints with the experts sharded over expert parallelism (EP): the trainer's
run checkpoint (model and distributed-optimizer state) saved at EP=2 by 2 gloo ranks, each
writing its own experts, resumed bit-exactly at EP=2 and resharded to EP=1 (and EP=1 -> EP=2);
the conversion tools HF -> checkpoint at EP=2 -> HF, bit-exact.

The tiny Qwen3-MoE (tests.tiny_models.tiny_hf_model): 2 layers, 4 experts of width 48, top-2.
At EP=2 on 2 ranks the dense part is data-parallel (DP=2) and each rank holds 2 experts per
layer (expert-DP=1); megatron builds two optimizers (dense, experts), one at EP=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_agpo.models import checkpoint as fmt
from megatron_agpo.models.weights import HFWeights
from megatron_agpo.trainer import checkpoint as ck
from tests import test_checkpoint
from tests.dist_utils import run_distributed
from tests.tiny_models import tiny_hf_model

ARCH = "Qwen3MoeForCausalLM"
EXPERT_KEYS = ("decoder.layers.mlp.experts.experts.linear_fc1.weight",
               "decoder.layers.mlp.experts.experts.linear_fc2.weight")  # fmt: skip


@pytest.fixture(scope="module")
def moe_hf(tmp_path_factory):
    return str(tiny_hf_model(tmp_path_factory.mktemp("moe_ckpt") / "hf", ARCH))


# ----------------------------------------------------------------------------- unit
def test_layout_names_expert_parallel():
    assert fmt.layout_str({"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 2,
                           "expert_parallel": 2}) == "TP=1 PP=1 DP=2 EP=2"  # fmt: skip
    # EP=1 (a dense model) and layouts written before EP was recorded read as before.
    for layout in ({"tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 1},
                   {"tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 1,
                    "expert_parallel": 1}):  # fmt: skip
        assert fmt.layout_str(layout) == "TP=2 PP=1 DP=1"
    assert fmt.parallel_layout()["expert_parallel"] == 1  # no process groups


def test_bad_expert_parallel_refused_before_anything_runs(moe_hf, tmp_path, monkeypatch):
    from megatron_agpo.models import ModelConfig

    dense = tiny_hf_model(tmp_path / "dense", "Qwen3ForCausalLM")
    with pytest.raises(ValueError, match="^ep=2 needs a mixture-of-experts model; .* dense"):
        fmt.convert_hf_to_megatron(dense, tmp_path / "out", ep=2)
    with pytest.raises(ValueError, match="^ep=3 does not divide the 4 experts of "):
        fmt.convert_hf_to_megatron(moe_hf, tmp_path / "out", ep=3)
    assert not (tmp_path / "out").exists()
    # Resuming at an EP that does not divide the experts: named before anything is loaded.
    cfg = ModelConfig.from_hf(moe_hf)
    saved = {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 2,
             "expert_parallel": 2, "world_size": 2}  # fmt: skip
    manifest = {"layout": saved, "model_config": cfg.to_dict(), "optimizer_format": "x"}
    monkeypatch.setattr(ck, "parallel_layout", lambda: {**saved, "expert_parallel": 3})
    with pytest.raises(fmt.CheckpointError, match=r"written at TP=1 PP=1 DP=2 EP=2 and cannot "
                       r"be resharded to this run's TP=1 PP=1 DP=2 EP=3: num_experts=4 is not "
                       r"divisible by parallel.expert_parallel=3"):  # fmt: skip
        ck.check_layout(Path("ckpt"), manifest, cfg)
    # The same layout but for EP is a layout change (the RNG tracker is not restored).
    monkeypatch.setattr(ck, "parallel_layout", lambda: {**saved, "expert_parallel": 1})
    assert ck.check_layout(Path("ckpt"), {**manifest, "optimizer_format": ck.OPTIMIZER_FORMAT},
                           cfg)  # fmt: skip


# ----------------------------------------------------------------------------- dist
def _make(ep: int, hf: str):
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import (
        OptimizerSettings,
        ParallelConfig,
        init_parallel,
        wrap_for_training,
    )

    pc = ParallelConfig(expert_parallel=ep)  # the distributed optimizer (the default)
    init_parallel(pc)
    model, mcfg = build_model_from_hf(hf)
    model, opt = wrap_for_training(model, pc, OptimizerSettings(lr=1e-2))
    return model, opt, mcfg


# One Adam step on a seeded batch, and every weight under its HF name (experts all-gathered
# over EP): the dense checkpoint tests' helpers. Every rank gets the same batch, so at EP=2
# (DP=2) the mean gradient is the one-rank gradient.
_step, _hf_tensors = test_checkpoint._step, test_checkpoint._hf_tensors


def _optimizer_state(model, opt) -> dict:
    """This rank's part of the optimizer state in model space: "<state>.<param key>@<global
    offset>" -> tensor (the fp32 main parameter, exp_avg, exp_avg_sq, each in its
    parameter's shape, an expert under its global index), from megatron's own model-space
    view (the checkpoint's format). The union over the ranks is the whole state; it does not
    depend on the layout, so states at EP=2 and EP=1 compare key by key."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
        is_main_replica,
    )

    sd = ck._optimizer_sharded_state(model.module.sharded_state_dict(), opt, is_loading=False)
    out = {}
    for t in nested_values(sd):
        # The experts' fc1 [gate; up] is a factory: two tensors (SwiGLU's halves).
        pieces = nested_values(t.build()) if isinstance(t, ShardedTensorFactory) else [t]
        for p in pieces:
            if isinstance(p, ShardedTensor) and is_main_replica(p.replica_id):
                key = f"{p.key}@{tuple(p.global_offset)}"
                assert key not in out, key
                out[key] = p.data.detach().clone()
    return out


def _gather_keys(mine: dict) -> set:
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(mine))
    return {k for keys in every for k in keys}


def _save(rank, world, hf, root, ep):
    model, opt, mcfg = _make(ep, hf)
    _step(model, opt, 0)
    _step(model, opt, 1)
    ck.save(Path(root), 2, model, opt, {"step": 2}, keep_last=2, mcfg=mcfg, hf_dir=hf)
    saved = _hf_tensors(model, mcfg)
    state = _optimizer_state(model, opt)
    torch.save(state, Path(root) / f"optimizer_rank{rank}.pt")
    keys = _gather_keys(state)
    _step(model, opt, 2)
    after = _hf_tensors(model, mcfg)
    if rank == 0:
        torch.save({"saved": saved, "after": after, "keys": keys}, Path(root) / "reference.pt")


def _resume(rank, world, hf, root, ep, written):
    import glob

    model, opt, mcfg = _make(ep, hf)
    logs = []
    state = ck.load(ck.latest(Path(root)), model, opt, mcfg, log=logs.append)
    assert state["step"] == 2 and state["adam_step"] == 2.0, state
    now = fmt.layout_str(fmt.parallel_layout())
    resharded = written != now
    if rank == 0:
        assert (f"written at {written}, loading at {now}" in logs[0]) if resharded else not logs
    ref = torch.load(Path(root) / "reference.pt", weights_only=True)
    got = _hf_tensors(model, mcfg)
    assert sorted(got) == sorted(ref["saved"])
    for name, t in got.items():
        assert torch.equal(t, ref["saved"][name]), f"{name} changed in the resume {written}->{now}"
    # The optimizer state, parameter by parameter (experts by global index): bit-exact.
    saved_state = {}
    for f in sorted(glob.glob(str(Path(root) / "optimizer_rank*.pt"))):
        saved_state.update(torch.load(f, weights_only=True))
    assert set(saved_state) == ref["keys"]
    mine = _optimizer_state(model, opt)
    assert _gather_keys(mine) == ref["keys"]  # every expert's state is on some rank
    assert any(k.startswith(f"optimizer.state.exp_avg.{EXPERT_KEYS[0]}@") for k in ref["keys"])
    for k, t in mine.items():
        assert t.dtype == saved_state[k].dtype and torch.equal(t, saved_state[k]), (
            f"optimizer state {k} differs after the resume {written} -> {now}"
        )
    # The next update equals the saving run's: bit-exact at the same layout; resharded, the
    # gradients are reduced in another order (the experts' over other ranks).
    _step(model, opt, 2)
    for name, t in _hf_tensors(model, mcfg).items():
        if resharded:
            torch.testing.assert_close(t, ref["after"][name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(t, ref["after"][name]), f"{name}: next step differs"


def _expert_writers(ckpt: Path) -> dict[int, set[int]]:
    """Which ranks wrote each expert's weights (every layer) into the model part: {global
    expert index: ranks}, from the checkpoint's metadata (read with the restricted
    unpickler): the files are __<rank>_<writer thread>.distcp."""
    md = fmt.read_dcp_metadata(ckpt / fmt.MODEL_SUBDIR / ".metadata")
    out: dict[int, set[int]] = {}
    for idx, info in md.storage_data.items():
        if idx.fqn in EXPERT_KEYS:  # offset: (layer, expert, row, column)
            rank = int(info.relative_path.split("_")[2])
            out.setdefault(int(idx.offset[1]), set()).add(rank)
    return out


def _export(rank, world, ckpt, out):
    fmt.convert_megatron_to_hf(ckpt, out)


@pytest.mark.dist
def test_ep2_run_checkpoint_resumes_bit_exact_reshards_to_ep1_and_exports(moe_hf, tmp_path):
    """The trainer's checkpoint of a Qwen3-MoE at EP=2 (2 ranks, each writing its 2 experts
    of every layer and their Adam state): resumed at EP=2 the weights and every optimizer
    tensor are bit-exact and the next step equals the saving run's bit for bit; resumed in
    one process at EP=1 the weights and optimizer state are bit-exact; the export tool reads
    it into HF files bit-exact with the weights saved."""
    run_distributed(_save, 2, moe_hf, str(tmp_path), 2)
    step = tmp_path / "step_0000002"
    manifest = json.loads((step / fmt.MANIFEST).read_text())
    assert fmt.layout_str(manifest["layout"]) == "TP=1 PP=1 DP=2 EP=2"
    assert manifest["model_config"]["num_experts"] == 4
    # Each rank wrote its own experts: experts 0-1 rank 0, experts 2-3 rank 1.
    assert _expert_writers(step) == {0: {0}, 1: {0}, 2: {1}, 3: {1}}
    run_distributed(_resume, 2, moe_hf, str(tmp_path), 2, "TP=1 PP=1 DP=2 EP=2")
    run_distributed(_resume, 1, moe_hf, str(tmp_path), 1, "TP=1 PP=1 DP=2 EP=2")
    run_distributed(_export, 1, str(step), str(tmp_path / "hf_out"))
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)["saved"]
    out = HFWeights(tmp_path / "hf_out")
    assert sorted(out.keys()) == sorted(ref)
    for name in ref:
        assert torch.equal(out.get(name), ref[name]), f"{name} differs in the export"


@pytest.mark.dist
def test_ep1_run_checkpoint_reshards_to_ep2(moe_hf, tmp_path):
    """Saved in one process at EP=1 (one optimizer), resumed by 2 ranks at EP=2 (the dense
    and the expert optimizer): weights and every optimizer tensor bit-exact."""
    run_distributed(_save, 1, moe_hf, str(tmp_path), 1)
    run_distributed(_resume, 2, moe_hf, str(tmp_path), 2, "TP=1 PP=1 DP=1")


def _convert(rank, world, hf, ckpt, ep, tp=1):
    fmt.convert_hf_to_megatron(hf, ckpt, tp=tp, ep=ep)


@pytest.mark.dist
@pytest.mark.parametrize(("tp", "layout"), [(1, "TP=1 PP=1 DP=2 EP=2"), (2, "TP=2 PP=1 DP=1 EP=2")])
def test_convert_hf_to_ep2_checkpoint_and_back_bit_exact(moe_hf, tmp_path, tp, layout):
    """HF -> checkpoint written at EP=2 by 2 ranks (each its experts; the dense part
    data-parallel, or split over TP=2) -> HF in one process: every tensor bit-exact
    (float32)."""
    from tests.test_convert import _assert_bit_exact

    ckpt = tmp_path / "ck"
    run_distributed(_convert, 2, moe_hf, str(ckpt), 2, tp)
    manifest = json.loads((ckpt / fmt.MANIFEST).read_text())
    assert manifest["kind"] == "model"
    assert fmt.layout_str(manifest["layout"]) == layout
    assert _expert_writers(ckpt) == {0: {0}, 1: {0}, 2: {1}, 3: {1}}
    run_distributed(_export, 1, str(ckpt), str(tmp_path / "out"))
    _assert_bit_exact(Path(moe_hf), tmp_path / "out")


@pytest.mark.e2e
@pytest.mark.dist
def test_cli_round_trip_bf16_saved_at_ep2_exported_at_ep1(tmp_path):
    """The conversion tools on a bf16 Qwen3-MoE: tools/convert_hf_to_megatron.py --ep 2 (2
    gloo processes) -> tools/convert_megatron_to_hf.py, bit-exact, and transformers computes
    the same logits from the export."""
    from tests.test_convert import _export_and_check, _run_tool

    src = tiny_hf_model(tmp_path / "hf", ARCH, dtype=torch.bfloat16)
    _run_tool("tools/convert_hf_to_megatron.py", "--hf", str(src), "--out", str(tmp_path / "ck"),
              "--ep", "2")  # fmt: skip
    manifest = json.loads((tmp_path / "ck" / fmt.MANIFEST).read_text())
    assert manifest["layout"]["expert_parallel"] == 2
    assert manifest["model_config"]["params_dtype"] == "bfloat16"
    _export_and_check(src, tmp_path / "ck", tmp_path / "out")
