"""`agpo-train`'s side of process management: start torchrun as a child, pass preemption
signals to the ranks, and leave nothing behind when it dies.

- torchrun runs in its own process group and gets SIGKILL when the launcher dies
  (PR_SET_PDEATHSIG); the ranks get SIGKILL when torchrun dies (they set it themselves,
  megatron_agpo.trainer.preemption.die_with_parent), and the vLLM replicas when their rank
  dies: a `kill -9` of the launcher stops the whole tree.
- SIGTERM / SIGUSR1 to the launcher go to the ranks (torchrun's children), which finish the
  step, save and exit with 75. torchrun itself ignores them: its own handler would SIGTERM the
  ranks and SIGKILL them 30 s later, in the middle of a long save.
- SIGINT (Ctrl-C) goes to torchrun, which stops the ranks its own way.
- The exit code is torchrun's, except that a preempted run (rank 0 wrote the status file
  named by AGPO_EXIT_STATUS_FILE) exits with 75 so that a scheduler requeues it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

EXIT_STATUS_ENV = "AGPO_EXIT_STATUS_FILE"
_PR_SET_PDEATHSIG = 1
FORWARDED_TO_RANKS = (signal.SIGTERM, signal.SIGUSR1)


def _child_setup() -> None:
    """preexec_fn of torchrun: die with the launcher; block the signals meant for the ranks.
    Blocked, not ignored: torchrun never acts on them (a SIGTERM to every process of the job
    leaves it running), and the ranks inherit the mask, so a signal sent to a rank before its
    handler exists stays pending until the rank's first line (early_signals.catch_early)
    records it. An ignored one would be lost."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_TO_RANKS)


def leave(code: int) -> NoReturn:
    """Exit a process that has finished and closed what it owns, without tearing the
    interpreter down.

    Why: Python's finalisation of the torch / megatron-core module graphs takes about 1.2 s
    per rank on the CPU machine (0.8 s for a vLLM replica), and a run waits for its slowest
    process, so every run paid it at its end. The exit handlers still run (logging,
    TensorBoard, W&B, torch's own), the standard streams are flushed, then the process leaves
    with `code`; the kernel frees its memory either way. With a non-daemon thread still alive
    it exits the normal way, which waits for that thread."""
    main = threading.main_thread()
    if any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def children_of(pid: int) -> list[int]:
    """Direct children of pid (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(d.name))
    return out


def read_exit_status(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def run_ranks(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun (cmd) to completion with signal forwarding; returns the exit code."""
    fd, status_path = tempfile.mkstemp(prefix="agpo-exit-", suffix=".json")
    os.close(fd)
    os.unlink(status_path)
    env = {
        **env,
        EXIT_STATUS_ENV: status_path,
        # torchrun must not turn SIGTERM into "kill the ranks in 30 s"; the ranks handle it.
        "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT",
    }
    from megatron_agpo.early_signals import take_pending

    proc = subprocess.Popen(cmd, env=env, preexec_fn=_child_setup, start_new_session=True)
    # Signals for the ranks that came before the ranks exist (during the warm start, or
    # while torchrun starts them): delivered as soon as they do.
    pending = [s for s in take_pending() if s in FORWARDED_TO_RANKS]

    def deliver() -> None:
        if not pending:  # the common case: no scan of /proc every poll
            return
        ranks = children_of(proc.pid)
        while pending and ranks:
            signum = pending.pop(0)
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    def forward(signum, _frame):
        if signum in FORWARDED_TO_RANKS:
            pending.append(signum)
            deliver()
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    handled = (*FORWARDED_TO_RANKS, signal.SIGINT)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_TO_RANKS)
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.2)  # a short wait: pending signals go out soon
                break
            except subprocess.TimeoutExpired:
                deliver()
            except InterruptedError:  # pragma: no cover - PEP 475 retries; belt and braces
                continue
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        if proc.poll() is None:  # the launcher itself is failing: take the tree down
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    status = read_exit_status(Path(status_path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(status_path)
    if status is not None and (rc != 0 or status.get("exit", 0) != 0):
        return int(status.get("exit", rc))
    return rc


def refused_exit(code: int, rank: int) -> int:
    """The exit code for a rank that stops the run on purpose (every rank got the same
    verdict, rank 0 printed it): `code` where no launcher is listening; under `agpo-train`,
    rank 0 leaves `code` for the launcher and every rank exits 0, so that torchrun does not
    print a traceback of "failed" children after the one-line error."""
    if not os.environ.get(EXIT_STATUS_ENV):
        return code
    if rank == 0:
        write_exit_status(code)
    return 0


def write_exit_status(code: int, **info) -> None:
    """Rank 0 of a run under run_ranks: tell the launcher why the ranks are exiting."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if path:
        Path(path).write_text(json.dumps({"exit": code, "time": time.time(), **info}))
