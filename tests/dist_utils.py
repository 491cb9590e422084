"""Run a test body in N gloo processes (CPU), propagating failures with the rank's traceback."""

from __future__ import annotations

import os
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_agpo.parallel import free_port


def _entry(rank: int, world_size: int, port: int, fn, args, errq) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        # Leave together: a rank that tears gloo down while its peer still holds the pair
        # open can be aborted (SIGABRT) in gloo's destructor.
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 300.0) -> None:
    """Call fn(rank, world_size, *args) in world_size spawned processes joined by gloo.

    fn must be a module-level function (spawn pickles it). Raises with the first failing
    rank's traceback.
    """
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errq), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    if errors:
        rank, tb = errors[0]
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    if alive:
        raise TimeoutError(f"{len(alive)} of {world_size} ranks still running after {timeout}s")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise AssertionError(f"ranks exited with codes {codes}")
