#!/usr/bin/env python3
"""A stand-in for `python -m megatron_agpo.train` in the SLURM job scripts' tests: the trainer's
preemption contract in a few lines, with no torch, so the batch shell's signal forwarding and
requeue can be tested in seconds.

Run as PYTHON=tests/slurm_standin.py: it gets `-m megatron_agpo.train <overrides>`. Each rank
(SLURM_PROCID) runs `trainer.steps` steps of `STANDIN_STEP_S` seconds, appending
"<step> <restart>" to `<logging.run_dir>/rank<r>.steps`, and keeps a checkpoint (the last step
done) in `rank<r>.ckpt`, from which a new start resumes. SIGUSR1/SIGTERM: finish the step,
save, exit 75. Like a real rank it has a worker child (the reward pool's); a rank whose worker
died (e.g. of a signal meant for the rank) exits 3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    assert argv[:2] == ["-m", "megatron_agpo.train"], argv
    over = dict(a.split("=", 1) for a in argv[2:])
    run = Path(over["logging.run_dir"])
    steps = int(over["trainer.steps"])
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    step_s = float(os.environ.get("STANDIN_STEP_S", "1"))
    ckpt, log = run / f"rank{rank}.ckpt", run / f"rank{rank}.steps"
    stop: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.append(s))
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    step = int(ckpt.read_text()) if ckpt.exists() else 0
    print(f"rank {rank} start at step {step}, restart {restart}", flush=True)
    try:
        while step < steps:
            time.sleep(step_s)
            step += 1
            with log.open("a") as f:
                f.write(f"{step} {restart}\n")
            if worker.poll() is not None:
                print(f"rank {rank}: worker died ({worker.returncode})", flush=True)
                return 3
            ckpt.write_text(str(step))  # a checkpoint per step: what a resume starts from
            if stop:
                print(f"rank {rank}: preempted at step {step}; exit 75", flush=True)
                return 75
        return 0
    finally:
        worker.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
