"""What every run pays at a process's start and end, and the two things that cut it: vLLM's
compiled helpers run eagerly on a CPU engine asked to be eager (`vllm_engine.eager_helpers`),
and a finished process leaves without the interpreter's teardown (`launcher.leave`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_agpo.rollout.vllm_engine import eager_helpers


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA engines keep vLLM's compiles")
def test_eager_helpers_skip_the_compile_on_a_cpu_engine_asked_to_be_eager():
    from torch._dynamo import config as dynamo_config

    compiled = []

    def backend(gm, example_inputs):  # counts compiles, runs the captured graph as it is
        compiled.append(len(example_inputs))
        return gm.forward

    # vLLM's batched_count_greater_than (per row, the entries >= its threshold), twice: dynamo
    # remembers per code object that it ran a function uncompiled.
    eager = torch.compile(lambda x, v: (x >= v).sum(-1), backend=backend)
    other = torch.compile(lambda x, v: (x >= v).sum(dim=-1), backend=backend)
    x = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.4]])
    v = torch.tensor([[0.3], [0.4]])
    with eager_helpers(True):
        assert eager(x, v).tolist() == [2, 2]
    assert compiled == []  # ran eagerly
    assert dynamo_config.disable is False  # the switch is restored on the way out
    with eager_helpers(False):  # enforce_eager off: vLLM's compile as vLLM has it
        assert other(x, v).tolist() == [2, 2]
    assert len(compiled) == 1


LEAVE = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from pathlib import Path
    from megatron_agpo.launcher import leave

    out = Path(sys.argv[1])

    class Finalised:  # written at interpreter teardown only
        def __del__(self):
            (out / "teardown").write_text("ran")

    keep = Finalised()
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    sys.stdout.write("buffered, not flushed")  # a pipe: block-buffered
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    if sys.argv[2] == "busy":  # a non-daemon thread still working: the normal exit waits
        def work():
            time.sleep(0.5)
            (out / "thread").write_text("done")
        threading.Thread(target=work).start()
    leave(3)
    """
)


@pytest.mark.parametrize("case", ["idle", "busy"])
def test_leave_runs_the_exit_handlers_flushes_and_skips_the_teardown(tmp_path, case):
    res = subprocess.run([sys.executable, "-c", LEAVE, str(tmp_path), case],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert res.stdout == "buffered, not flushed"
    assert (tmp_path / "atexit").read_text() == "ran"
    if case == "idle":
        assert not (tmp_path / "teardown").exists()  # no interpreter teardown
    else:  # the normal way: the thread finishes, then the teardown
        assert (tmp_path / "thread").read_text() == "done"
        assert (tmp_path / "teardown").read_text() == "ran"
