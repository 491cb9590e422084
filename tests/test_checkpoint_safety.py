"""No checkpoint byte runs code: a crafted `_extra_state` bytes item (payload appended to a
shard, offsets rewritten, manifest rehashed) is refused at resume and at export, naming the
file; a Megatron-LM layout (no manifest) refuses the same and a crafted common.pt."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_agpo.models import checkpoint as fmt
from tests.dist_utils import run_distributed
from tests.test_checkpoint import _load_expect, _Payload, _rehash, _save_tp1

REPO = Path(__file__).resolve().parent.parent


def craft_extra_state(model_dir: Path, marker: Path) -> str:
    """Append a pickle that runs `touch marker` to a shard and point the first `_extra_state`
    item of the metadata at it. Returns the item's name."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    meta = fmt.read_dcp_metadata(model_dir / ".metadata")
    idx = next(k for k in meta.storage_data if "_extra_state" in k.fqn)
    info = meta.storage_data[idx]
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    shard = model_dir / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    meta.storage_data[idx] = _StorageInfo(info.relative_path, offset, len(buf.getvalue()))
    (model_dir / ".metadata").write_bytes(pickle.dumps(meta))
    return idx.fqn


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tiny")))


@pytest.mark.e2e
@pytest.mark.dist
def test_crafted_extra_state_is_refused_at_resume_and_export(tiny_hf, tmp_path):
    run_distributed(_save_tp1, 1, tiny_hf, str(tmp_path))
    c = tmp_path / "step_0000002"
    marker = tmp_path / "pwned"
    craft_extra_state(c / "model", marker)
    _rehash(c)
    fmt.verify(c)  # the manifest is no signature: the tampered folder passes its hashes
    refused = r"model/__0_\d\.distcp \(item .*_extra_state.*\) was refused: it references code"
    run_distributed(_load_expect, 1, tiny_hf, str(c), refused)
    assert not marker.exists()
    res = subprocess.run(
        [sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt", str(c),
         "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    err = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "__0_" in err[0] and "was refused" in err[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not marker.exists()


@pytest.mark.dist  # one gloo process each
def test_megatron_lm_layout_runs_no_code(tmp_path):
    from tests.test_checkpoint_megatron_lm import _write_megatron_lm
    from tests.tiny_models import tiny_hf_model

    src = tiny_hf_model(tmp_path / "hf")
    run_distributed(_write_megatron_lm, 1, str(src), str(tmp_path / "mlm"))
    it = tmp_path / "mlm" / "iter_0000010"
    pristine = {p: p.read_bytes() for p in it.iterdir() if p.is_file()}
    marker = tmp_path / "pwned"
    craft_extra_state(it, marker)
    with pytest.raises(fmt.CheckpointError, match=r"iter_0000010/__0_\d\.distcp \(item "):
        fmt.convert_megatron_to_hf(tmp_path / "mlm", tmp_path / "out", tokenizer=src)
    assert not marker.exists()
    for p, b in pristine.items():
        p.write_bytes(b)
    # common.pt (the run's saved arguments) with code in it: refused even where torch's
    # default is switched back to the full unpickler.
    torch.save({"args": _Payload(marker)}, it / "common.pt")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with pytest.raises(fmt.CheckpointError, match=r"common\.pt.* references code"):
            fmt.convert_megatron_to_hf(
                tmp_path / "mlm", tmp_path / "out", tokenizer=src, hf_config=src
            )
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    assert not marker.exists()
