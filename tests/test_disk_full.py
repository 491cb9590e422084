"""A full disk during a save is named: "no space left on device", the folder and the bytes
needed, before anything is written when the disk is visibly too small, or when a write
fails midway (the partial save removed). Not torch's "unexpected pos 704 vs 598"."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from megatron_agpo.trainer import checkpoint as ck
from tests.dist_utils import run_distributed
from tests.test_checkpoint import _make, _step


def _save_on(rank, world, hf, root, fail_midway):
    import torch

    from megatron_agpo.parallel import ParallelConfig, init_parallel

    pc = ParallelConfig()
    init_parallel(pc)
    model, opt, mcfg = _make(pc, hf)
    _step(model, opt, 0)
    if fail_midway:  # the disk fills while the RNG states are written

        def full(*a, **k):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598"
            ) from OSError(errno.ENOSPC, "No space left on device")

        torch.save = full
    with pytest.raises(ck.CheckpointError) as e:
        ck.save(Path(root), 1, model, opt, {"step": 1}, keep_last=2, mcfg=mcfg, hf_dir=hf)
    msg = str(e.value)
    assert msg.startswith("no space left on device: saving ") and "\n" not in msg, msg
    assert "step_0000001 needs about " in msg and f"bytes) in {root}, which has" in msg, msg
    assert not list(Path(root).glob(".tmp-*")), "the partial save was left behind"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tiny")))


@pytest.mark.dist
def test_full_disk_during_a_save_is_named(tiny_hf, tmp_path):
    run_distributed(_save_on, 1, tiny_hf, str(tmp_path / "a"), True)
    # A real full disk: a 64 KiB tmpfs (root only; skipped elsewhere).
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        run_distributed(_save_on, 1, tiny_hf, str(small / "ckpts"), False)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_disk_full_symptoms_are_recognised():
    from torch.distributed.checkpoint.api import CheckpointException

    wrapped = CheckpointException("write", {0: (OSError(errno.ENOSPC, "full"), None)})
    assert ck._disk_full(wrapped)
    assert ck._disk_full(RuntimeError("unexpected pos 704 vs 598"))
    assert not ck._disk_full(RuntimeError("something else"))
