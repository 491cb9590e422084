"""Run a test body in N gloo processes (CPU), propagating failures with the rank's traceback.

The processes are kept between tests (one pool per world size in each pytest process): a
spawned rank costs about 5 CPU-seconds of imports (torch, megatron-core, the test module)
before its test body runs a fraction of a second, and the suite runs about a hundred such
bodies. Each body gets a fresh default process group on a new port and the state a fresh
process would have where tests touch it (environment, working folder, default dtype, threads,
grad mode, random streams, signal handlers, megatron's parallel state and router-replay
registry). A world whose body failed, timed out, or imported vLLM (an engine leaves threads
and module state behind) is not reused: its processes exit and the next test spawns new ones.
`AGPO_TEST_FRESH_RANKS=1` spawns new processes for every test (the old behaviour).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import random
import signal
import sys
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_agpo.parallel import free_port

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def _reset_after_body(start: dict) -> None:
    """What a test body may leave behind, put back as the process started."""
    if "megatron.core.parallel_state" in sys.modules:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if "megatron.core.transformer.moe.router_replay" in sys.modules:
        # Every MoE router built registers itself here for the process's lifetime.
        from megatron.core.transformer.moe.router_replay import RouterReplay

        RouterReplay.global_router_replay_instances.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(start["env"])
    os.chdir(start["cwd"])
    torch.set_default_dtype(start["dtype"])
    torch.set_num_threads(start["threads"])
    torch.set_grad_enabled(True)
    # A fresh process's random streams (torch's default generator has a fixed initial seed:
    # tests that draw without seeding get the same numbers on every rank).
    torch.set_rng_state(start["rng"])
    random.setstate(start["py_rng"])
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.set_state(start["np_rng"])
    for sig, handler in start["signals"].items():
        signal.signal(sig, handler)
    gc.collect()


def _serve(rank: int, world_size: int, conn) -> None:
    """A pooled rank: run (fn, args, port) bodies until told to stop or one fails."""
    start = {
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "signals": {s: signal.getsignal(s) for s in _SIGNALS},
        "rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
    }
    import numpy

    start["np_rng"] = numpy.random.get_state()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, args, port = task
        error = None
        try:
            _body(rank, world_size, port, fn, args)
        except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
            error = traceback.format_exc()
        try:
            _reset_after_body(start)
        except BaseException:  # noqa: BLE001
            error = error or traceback.format_exc()
        reusable = error is None and "vllm" not in sys.modules
        conn.send((error, reusable))
        if not reusable:
            # Exiting closes this rank's sockets: a peer blocked in a collective fails now
            # instead of at its timeout.
            return


def _body(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    # Leave together: a rank that tears gloo down while its peer still holds the pair open
    # can be aborted (SIGABRT) in gloo's destructor.
    dist.barrier()


class _World:
    """world_size spawned ranks that run one test body after another."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.conns, self.procs = [], []
        for r in range(world_size):
            parent, child = ctx.Pipe()
            # Not daemonic: a test body may start processes of its own.
            p = ctx.Process(target=_serve, args=(r, world_size, child), daemon=False)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, fn, args, timeout: float) -> tuple[list[tuple[int, str]], bool, bool]:
        """(errors by rank, every rank reusable, timed out)."""
        port = free_port()
        for c in self.conns:
            c.send((fn, args, port))
        deadline = time.monotonic() + timeout
        replies: dict[int, tuple[str | None, bool]] = {}
        while len(replies) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waiting = {self.conns[r]: r for r in range(self.world_size) if r not in replies}
            for c in wait(list(waiting), timeout=left):
                r = waiting[c]
                try:
                    replies[r] = c.recv()
                except (EOFError, OSError):
                    self.procs[r].join(5)
                    code = self.procs[r].exitcode
                    replies[r] = (f"rank {r} exited with code {code} during the test", False)
        errors = sorted((r, e) for r, (e, _) in replies.items() if e)
        timed_out = len(replies) < self.world_size
        reusable = not timed_out and all(ok for _, ok in replies.values())
        return errors, reusable, timed_out

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, ValueError):
                c.send(None)
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()


_POOL: dict[tuple, _World] = {}
"""Idle worlds by (world size, the environment they were started with): a test that sets a
variable before its ranks start (TRITON_INTERPRET=1, read when Triton kernels are decorated)
gets ranks started with it, as a fresh spawn would."""
_POOL_MAX = 2
"""Idle worlds kept (each rank holds torch and megatron-core: about 0.5 GB)."""


@atexit.register
def _close_pool() -> None:  # before multiprocessing's own exit hook joins its children
    while _POOL:
        _POOL.popitem()[1].close()


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 300.0) -> None:
    """Call fn(rank, world_size, *args) in world_size processes joined by gloo.

    fn must be a module-level function (it is pickled by name). Raises with the first failing
    rank's traceback.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # set per test
    key = (world_size, tuple(sorted(env.items())))
    world = _POOL.pop(key, None) or _World(world_size)
    errors, reusable, timed_out = world.run(fn, args, timeout)
    if reusable and os.environ.get("AGPO_TEST_FRESH_RANKS", "0") != "1":
        _POOL[key] = world
        while len(_POOL) > _POOL_MAX:  # the least recently used goes
            _POOL.pop(next(iter(_POOL))).close()
    else:
        world.close()
    if errors:
        rank, tb = errors[0]
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    if timed_out:
        raise TimeoutError(f"ranks of a world of {world_size} still running after {timeout}s")


def called_together(fn, n: int) -> tuple[list, list[Exception]]:
    """Call `fn()` from n threads started at once (callers racing for one cache entry): the
    results and the exceptions raised, each in the order they came."""
    import threading

    results, errors = [], []

    def call():
        try:
            results.append(fn())
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors
