"""A small pool of worker processes that runs picklable calls under a per-call deadline.

Why processes and not math-verify's own timeout: that timeout is a SIGALRM handler, so it only
works on the main thread, and sympy spends long stretches in C code that a Python signal
handler cannot interrupt. A worker process can always be stopped: on overrun it is killed
(SIGKILL) and a fresh one takes its slot.

Thread-safe: any thread may call `DeadlinePool.call`; each call borrows one idle worker, so at
most `num_workers` calls run at once and the rest wait for a worker. The deadline covers the
call's work in the worker (send, run, answer), not the wait for a free worker nor a
replacement worker's start-up (its imports), so a slow start cannot be mistaken for a hang.

Scripts that use the pool with the "spawn" or "forkserver" start method need the
``if __name__ == "__main__":`` guard, as for any multiprocessing program.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

StartMethod = Literal["spawn", "forkserver"]


class CallTimeout(Exception):
    """The call overran its deadline; its worker was killed and replaced."""


class WorkerError(Exception):
    """The function raised in the worker, or the worker died (crash, out of memory)."""


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL when the process that started this worker dies (even by SIGKILL, when
    nothing else would stop a worker stuck in sympy). A no-op elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _worker_main(
    conn: Any, fn: Callable[..., Any], warmup: Callable[[], None] | None, parent: int = 0
) -> None:
    """Worker loop: warm up (imports), say ready, then answer requests until told to stop."""
    if parent:
        _die_with_parent(parent)
    if warmup is not None:
        warmup()
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the pool went away
        if request is None:
            return
        try:
            conn.send(("ok", fn(*request)))
        except Exception as e:  # every error becomes a counted WorkerError in the caller
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any, fn: Callable[..., Any], warmup: Callable[[], None] | None):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child_conn, fn, warmup, os.getpid()), daemon=True
        )
        self.proc.start()
        child_conn.close()  # so that recv() sees EOF if the child dies
        self.ready = False

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            raise WorkerError(f"worker did not start within {timeout_s} s")
        try:
            tag, _ = self.conn.recv()
        except EOFError as e:
            raise WorkerError(f"worker died while starting (exit code {self.proc.exitcode})") from e
        assert tag == "ready", tag
        self.ready = True

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        """Ask nicely, then kill: a worker stuck in sympy never reads the stop message."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.proc.join(timeout=1)
        self.kill()


@dataclass
class PoolCounters:
    """What happened to the calls of one pool (a snapshot; see `DeadlinePool.counters`)."""

    calls: int = 0
    """Calls answered in time (with a result or an error)."""
    timeouts: int = 0
    """Calls that overran the deadline; each one cost a worker."""
    errors: int = 0
    """Calls whose function raised, or whose worker died."""
    restarts: int = 0
    """Workers replaced (after a timeout or a death)."""


class DeadlinePool:
    """`num_workers` processes, each running `fn(*args)`, each call bounded by `timeout_s`.

    Workers start lazily on first use. `warmup` (picklable, no arguments) runs once in each new
    worker before it takes calls: the place for slow imports. Close with `close()` or a `with`
    block; leftover workers are daemons, so they also die with the parent.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        start_method: StartMethod = "spawn",
        startup_timeout_s: float = 120.0,
        warmup: Callable[[], None] | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._fn = fn
        self._warmup = warmup
        self._timeout_s = timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context(start_method)
        # A slot is None until its worker is first needed (or after it was killed).
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(num_workers):
            self._idle.put(None)
        self._num_workers = num_workers
        self._lock = threading.Lock()
        self._counters = PoolCounters()
        self._live: set[_Worker] = set()
        self._closed = False

    @property
    def counters(self) -> PoolCounters:
        with self._lock:
            return PoolCounters(**vars(self._counters))

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self._counters, k, getattr(self._counters, k) + v)

    def _start_worker(self) -> _Worker:
        w = _Worker(self._ctx, self._fn, self._warmup)
        with self._lock:
            self._live.add(w)
        return w

    def _discard(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            self._live.discard(w)

    def call(self, *args: Any) -> Any:
        """Run `fn(*args)` in a worker. Raises `CallTimeout` after `timeout_s` (the worker is
        killed and replaced) and `WorkerError` when `fn` raised or the worker died."""
        if self._closed:
            raise RuntimeError("DeadlinePool is closed")
        w = self._idle.get()
        keep = False  # whether the worker may take the next call
        try:
            if w is None:
                w = self._start_worker()
            try:
                w.wait_ready(self._startup_timeout_s)
                w.conn.send(args)
                if not w.conn.poll(self._timeout_s):
                    self._count(timeouts=1, restarts=1)
                    raise CallTimeout(f"call overran its {self._timeout_s} s deadline")
                tag, value = w.conn.recv()
            except (EOFError, OSError) as e:
                # The worker died (crash, OOM kill) or its pipe broke.
                self._count(errors=1, restarts=1)
                raise WorkerError(f"worker died (exit code {w.proc.exitcode}): {e!r}") from e
            except WorkerError:
                self._count(errors=1, restarts=1)
                raise
            keep = True
            if tag == "error":
                self._count(errors=1)
                raise WorkerError(value)
            self._count(calls=1)
            return value
        finally:
            if not keep and w is not None:
                self._discard(w)
                w = None
                if not self._closed:
                    # Start the replacement now: it imports in the background while this
                    # call returns, and the next call only waits for what is left of that.
                    try:
                        w = self._start_worker()
                    except OSError:
                        w = None  # the next call retries the start
            self._idle.put(w)

    def close(self) -> None:
        """Stop every worker; idempotent. Calls in flight in other threads get errors."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            live = list(self._live)
            self._live.clear()
        for w in live:
            w.stop()

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort for pools dropped without close(); never raise from a finalizer.
        with contextlib.suppress(Exception):
            self.close()
