"""Preemption: stop at a step boundary with a checkpoint, on a signal or before the job's end.

A SIGTERM or SIGUSR1 only sets a flag (a second one during the save changes nothing). At the
end of every step all ranks agree on the flag with one all-reduce (MAX) of a one-element
tensor on the model's device, so they stop after the same step, save, and exit with
EXIT_PREEMPTED (75, EX_TEMPFAIL): a scheduler requeues the job and it resumes from that
checkpoint with no step lost or repeated. The same happens when the job's end time (from
SLURM_JOB_END_TIME or checkpoint.end_time) is closer than checkpoint.save_before_end_s plus
the last step's duration.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; SLURM jobs requeue on it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written: the process exits with 75."""

    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


@dataclass
class StopReason:
    """Why a run stops early (recorded by rank 0)."""

    signal: int | None = None
    """The first preemption signal received, if any."""
    deadline: bool = False
    """The job's end time was too close to run another step."""
    count: int = 0
    """Signals received so far (more than one: the later ones were ignored)."""


@dataclass
class Preemption:
    """Signal handlers and the wall-clock guard of one trainer process."""

    end_time: float | None = None
    """Epoch seconds at which the job is killed (None: no deadline)."""
    margin_s: float = 0.0
    """Stop when fewer than this many seconds plus one step's duration remain."""
    reason: StopReason = field(default_factory=StopReason)
    _previous: dict = field(default_factory=dict)

    def install(self) -> None:
        """Main thread only. A handler that records the signal, restartable system calls (a
        signal must not fail a gloo/NCCL call in flight with EINTR)."""
        from megatron_agpo.early_signals import take_pending

        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)
        # Signals caught since the process started (early_signals), and any still blocked
        # since the launcher started torchrun: from now on they are this run's.
        for sig in take_pending():
            self._handle(sig, None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.reason.count += 1
        if self.reason.signal is None:
            self.reason.signal = signum

    def deadline_near(self, step_seconds: float, now: float | None = None) -> bool:
        if self.end_time is None:
            return False
        now = time.time() if now is None else now
        return self.end_time - now < self.margin_s + step_seconds

    def should_stop(self, step_seconds: float) -> bool:
        """Collective: True on every rank when any rank got a signal or sees the deadline."""
        local = self.reason.signal is not None
        if not local and self.deadline_near(step_seconds):
            self.reason.deadline = local = True
        flag = torch.tensor([1.0 if local else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
                flag = flag.to(torch.cuda.current_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def describe(self) -> str:
        if self.reason.signal is not None:
            return signal.Signals(self.reason.signal).name
        if self.reason.deadline:
            return "the job's end time"
        return "another rank"


def job_end_time(configured: float | None, environ: dict[str, str] | None = None) -> float | None:
    """The job's end (epoch seconds): SLURM_JOB_END_TIME when set, else the configured one."""
    env = os.environ if environ is None else environ
    raw = env.get("SLURM_JOB_END_TIME")
    if raw:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"SLURM_JOB_END_TIME={raw!r} is not epoch seconds") from None
    return configured


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets `sig` when its parent (torchrun, or the launcher) dies, so a
    killed launcher leaves no ranks behind. A no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
