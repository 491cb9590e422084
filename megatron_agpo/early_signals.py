"""Preemption signals caught from a process's first moments, before torch or megatron are
imported (the trainer's own handler, `trainer.preemption.Preemption`, is installed seconds or
minutes later, once the model is built).

The launcher starts torchrun with SIGTERM and SIGUSR1 *blocked* (not ignored): a blocked
signal sent to a rank that has not started yet stays pending, and the mask is inherited by
the ranks. Each rank calls `catch_early()` first thing: handlers that only record the signal,
then unblock, so a pending signal is delivered and recorded. `Preemption.install` takes over
what was recorded (`take_pending`).
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_pending: list[int] = []


def _record(signum, _frame) -> None:
    _pending.append(signum)


def catch_early() -> None:
    """Main thread only: record SIGTERM/SIGUSR1 from now on (restartable system calls), then
    deliver any that arrived while they were blocked."""
    for sig in SIGNALS:
        signal.signal(sig, _record)
        signal.siginterrupt(sig, False)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def take_pending() -> list[int]:
    """The signals recorded so far (oldest first), forgotten here."""
    out = list(_pending)
    _pending.clear()
    return out
