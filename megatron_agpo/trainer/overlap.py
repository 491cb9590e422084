"""Generation overlapping training (`trainer.max_staleness` = k > 0; docs/TRAINING.md).

The replicas sample the next batches while the trainer updates: at the start of step s the
stream holds the batches of the next k + 1 stream positions in flight (submitted to the
engine, `ReplicaPool.submit`), the trainer takes the oldest (waiting for it if it is not
done) and the replicas go on with the others while it computes log-probs and updates. A batch
submitted while the trainer is at version v is trained at a version <= v + k, so with every
step updating, its staleness (trainer version minus the version of a sample's oldest token)
is at most k; the filter (`drop_stale`) still checks every sample and drops the groups of
any sample beyond the bound (counted, never trained on).

Every rank holds a `RolloutStream` and draws the same prompts in the same order (the data
position is part of every rank's checkpoint); only rank 0 talks to the engine. A checkpoint
stores the position of the oldest batch not yet trained: in-flight rollouts are dropped and,
after a resume, generated again from the same prompts with the same seeds. A batch the step in
progress has taken counts as not yet trained until the step completes (`commit`): a rollout
failure in a later dynamic-sampling round of that step (a replica died mid-stream) stops the
run with the step's earlier rounds untrained, and the emergency checkpoint must regenerate
them too.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_agpo.rollout.types import RolloutBatch


@dataclass
class Pending:
    """One batch of the stream: submitted, not yet trained."""

    index: int
    """Stream position: the batch's number since the run began (its sampling seeds' key)."""
    prompts: list
    """The batch's prompts (every rank)."""
    data_state: dict
    """The prompt iterator's state before these prompts were drawn."""
    ticket: int | None
    """Rank 0: the engine's ticket for `collect`; None elsewhere."""
    version: int
    """The trainer's weight version when the batch was submitted."""
    samples: RolloutBatch | None = None
    """Rank 0: the batch's samples once collected ahead of its step (the background weight
    sync collects the next step's batch before it starts); None: not collected yet."""


class RolloutStream:
    """The in-flight batches of an overlapped run, in stream order."""

    def __init__(self, max_staleness: int, data, start_index: int) -> None:
        if max_staleness < 1:
            raise ValueError(f"max_staleness={max_staleness}: the stream needs k >= 1")
        self.k = max_staleness
        self.data = data
        self.index = start_index
        """The next stream position to submit."""
        self.pending: deque[Pending] = deque()
        self.taken: list[Pending] = []
        """Batches the step in progress took (`pop`): untrained until it completes."""
        self.dropped_total = 0
        """Samples dropped for staleness since the run (or the resume) began."""

    def top_up(self, submit: Callable[[list, int], int | None], version: int, most: int) -> None:
        """Submit batches until k + 1 are in flight, or `most` (the steps left: nothing is
        sampled past the run's end), or one when none is (a refill always gets one).
        submit(prompts, index) -> ticket."""
        for p in self.draw(version, most):
            p.ticket = submit(p.prompts, p.index)

    def draw(self, version: int, most: int) -> list[Pending]:
        """The batches `top_up` would submit, drawn from the prompts (every rank) and queued
        without a ticket: the caller submits them (the background weight sync does, after the
        engine has loaded `version`)."""
        new: list[Pending] = []
        while not self.pending or len(self.pending) < min(self.k + 1, most):
            state = self.data.state_dict()  # before the draw: the batch's data position
            p = Pending(self.index, self.data.next_batch(), state, None, version)
            self.pending.append(p)
            new.append(p)
            self.index += 1
        return new

    def head(self) -> Pending:
        return self.pending[0]

    def pop(self) -> Pending:
        """The oldest batch, taken by the step in progress (still in the checkpoint's
        position until `commit`)."""
        p = self.pending.popleft()
        self.taken.append(p)
        return p

    def commit(self) -> None:
        """The step in progress completed: the batches it took are trained."""
        self.taken.clear()

    def position(self) -> tuple[int, dict]:
        """(stream position, prompt-iterator state) of the oldest batch not yet trained
        (taken by an unfinished step, or in flight): what a checkpoint stores, so a resume
        regenerates those batches exactly."""
        if self.taken or self.pending:
            p = self.taken[0] if self.taken else self.pending[0]
            return p.index, p.data_state
        return self.index, self.data.state_dict()


class BackgroundSync:
    """A step's weight sync in a thread of its own, beside the next step's first stages
    (`trainer.background_sync`, docs/TRAINING.md).

    `work()` gathers the weights (over `GatherGroups`, never the groups the step's own
    collectives use) and, on rank 0, drives the engine: the weight update, then the
    submission of the batches drawn for the new version. It returns (the engine's failure as
    one line or None, rank 0's seconds inside the engine's update); whatever else it raises (a
    collective of the gather failed) `join` raises again. Until `join` returns, the trainer
    must not change the weights (the next optimizer step joins first) nor use the engine (one
    thread owns its socket: every other engine call joins first).

    On CUDA the thread queues its work on a stream of its own that first waits for what the
    main stream had queued when the sync started (the optimizer step that wrote the weights),
    and `join` makes the main stream wait for the thread's stream, so what the caller queues
    next (the optimizer step) runs after the gather has read the weights."""

    def __init__(self, work: Callable[[], tuple[str | None, float]], device: torch.device):
        self.failure: str | None = None
        self.engine_seconds = 0.0
        self.seconds = 0.0
        """Wall time of the whole sync, in its thread."""
        self._error: BaseException | None = None
        self._work, self._device = work, device
        self._ready = self._done = None
        if device.type == "cuda":
            self._ready, self._done = torch.cuda.Event(), torch.cuda.Event()
            self._ready.record()
        self._thread = threading.Thread(target=self._run, name="agpo-weight-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            if self._ready is None:
                self.failure, self.engine_seconds = self._work()
                return
            torch.cuda.set_device(self._device)  # the current device is per thread
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                stream.wait_event(self._ready)
                self.failure, self.engine_seconds = self._work()
                self._done.record(stream)
        except BaseException as e:  # noqa: BLE001 - raised again by `join`, in the trainer
            self._error = e
        finally:
            self.seconds = time.perf_counter() - t0

    def join(self) -> float:
        """Wait for the sync to end; the seconds waited (the sync's exposed time)."""
        t0 = time.perf_counter()
        self._thread.join()
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)
        if self._error is not None:
            raise self._error
        return time.perf_counter() - t0


def drop_stale(
    batch: RolloutBatch, trainer_version: int, max_staleness: int, group_size: int
) -> tuple[RolloutBatch | None, int]:
    """The batch without the groups holding a sample whose oldest token is more than
    `max_staleness` versions behind `trainer_version` (None when no group is left), and the
    number of samples dropped. Groups go whole: a group's advantages need all its samples."""
    samples = batch.samples
    keep, dropped = [], 0
    for g in range(0, len(samples), group_size):
        group = samples[g : g + group_size]
        if any(trainer_version - min(s.versions() or (s.weight_version,)) > max_staleness
               for s in group):  # fmt: skip
            dropped += len(group)
        else:
            keep.extend(group)
    if not keep:
        return None, dropped
    if dropped == 0:
        return batch, 0
    return RolloutBatch.from_samples(keep, allow_mixed=True), dropped


def staleness_metrics(
    token_versions: torch.Tensor,
    sample_versions: torch.Tensor,
    trainer_version: int,
    max_staleness: int,
) -> dict[str, float]:
    """Per step: the histogram of sample staleness (`staleness/samples_<d>`, counts), the
    share of response tokens sampled d versions behind (`staleness/tokens_<d>`), and the
    mean and max sample staleness, for d = 0..max_staleness."""
    s_age = trainer_version - sample_versions.to(torch.int64)
    t_age = trainer_version - token_versions.to(torch.int64)
    out: dict[str, float] = {
        "staleness/mean": float(s_age.double().mean()) if s_age.numel() else 0.0,
        "staleness/max": float(s_age.max()) if s_age.numel() else 0.0,
    }
    n_tok = max(t_age.numel(), 1)
    for d in range(max_staleness + 1):
        out[f"staleness/samples_{d}"] = float((s_age == d).sum())
        out[f"staleness/tokens_{d}"] = float((t_age == d).sum()) / n_tok
    return out
