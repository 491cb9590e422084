"""Rollouts on separate vLLM processes ("replicas"), any number of them.

The trainer binds one ZMQ DEALER socket per replica and starts the replica process
(`replica_worker`), which connects back. Prompts are split into contiguous chunks, one per
replica, and the samples gathered back in prompt order. Weights go over the same sockets in
size-bounded buckets, broadcast to every replica, the next bucket only after every replica
has consumed the previous one: the trainer holds one bucket, each replica one bucket.

Every wait has a deadline, and a replica whose process exits is noticed within a poll tick,
so a dead or silent replica raises an error naming it instead of hanging the trainer. A
replica that failed once is not used again (its state is unknown); build a new pool.

With `config.sync_channel="collective"`, the bucket headers still go over ZMQ but each
bucket's bytes go as one flat tensor over a private process group (trainer rank 0 plus the
replicas; gloo on CPU, NCCL with CUDA) built at pool start over the pool's own TCPStore,
never through `init_process_group`: a trainer's default group is left alone. A member that
fails during a collective sync breaks the group, so the whole pool is then unusable.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import zmq

from megatron_agpo.rollout import vllm_engine
from megatron_agpo.rollout.config import RolloutConfig
from megatron_agpo.rollout.types import (
    RolloutBatch,
    RolloutError,
    RolloutRequest,
    RolloutTimeoutError,
    Sample,
    StaleWeightsError,
    SyncReport,
)
from megatron_agpo.rollout.weight_sync import (
    CollectiveChannel,
    collective_backend,
    encode_bucket,
    iter_buckets,
    pack_bucket,
)

POLL_MS = 200
LOG_TAIL_CHARS = 3000


def _split(n_items: int, n_parts: int) -> list[range]:
    """Contiguous, near-equal index ranges (the first ones one longer)."""
    q, r = divmod(n_items, n_parts)
    out, start = [], 0
    for i in range(n_parts):
        end = start + q + (i < r)
        out.append(range(start, end))
        start = end
    return out


class ReplicaPool:
    """`RolloutEngine` over `config.num_replicas` vLLM worker processes."""

    def __init__(self, config: RolloutConfig, log_dir: str | Path | None = None) -> None:
        if not config.model_path:
            raise ValueError("RolloutConfig.model_path is empty")
        self.config = config
        # Replica logs: kept when given a folder or when a replica failed, else removed.
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="agpo_replicas_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ctx = zmq.Context()
        self._socks: list[zmq.Socket] = []
        self.addresses: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self._versions: list[int | None] = []
        self._failed: dict[int, str] = {}
        self._seq = 0
        self._channel: CollectiveChannel | None = None
        try:
            for i in range(config.num_replicas):
                self._launch(i)
            hello = self._gather(
                range(config.num_replicas),
                time.monotonic() + config.start_timeout_s,
                "start-up (hello)",
                config.start_timeout_s,
                seq=None,
            )
            self._versions = [h["version"] for h in hello]
            if config.sync_channel == "collective":
                self._start_collective()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- process plumbing

    def _launch(self, i: int) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port(f"tcp://{self.config.replica_host}")
        addr = f"tcp://{self.config.replica_host}:{port}"
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if self.config.cpu_kvcache_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.config.cpu_kvcache_space_gib)
        if self.config.replica_cuda_devices:
            env["CUDA_VISIBLE_DEVICES"] = self.config.replica_cuda_devices[i]
        log = open(self.log_dir / f"replica_{i}.log", "wb")  # noqa: SIM115 - owned by Popen
        cmd = [
            sys.executable,
            "-m",
            "megatron_agpo.rollout.replica_worker",
            "--connect",
            addr,
            "--index",
            str(i),
            "--config",
            json.dumps(self.config.to_dict()),
            "--parent-pid",
            str(os.getpid()),
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._socks.append(sock)
        self.addresses.append(addr)
        self.processes.append(proc)

    def _describe(self, i: int) -> str:
        return f"replica {i} (pid {self.processes[i].pid}, {self.addresses[i]})"

    def _log_tail(self, i: int) -> str:
        try:
            text = (self.log_dir / f"replica_{i}.log").read_text(errors="replace")
        except OSError:
            return ""
        return text[-LOG_TAIL_CHARS:]

    def _fail(self, i: int, message: str, timeout: bool = False) -> RolloutError:
        self._failed[i] = message
        if i < len(self._versions):
            self._versions[i] = None
        cls = RolloutTimeoutError if timeout else RolloutError
        return cls(message)

    def _check_usable(self, indices: Iterable[int]) -> None:
        for i in indices:
            if i in self._failed:
                raise RolloutError(f"{self._describe(i)} failed earlier: {self._failed[i]}")

    def _send(self, i: int, header: dict, frames: Sequence = ()) -> None:
        """Queue a message for replica i. A DEALER socket whose peer is gone (the replica
        exited) blocks a send forever, so send without blocking and, while the socket takes
        nothing, check the replica's process (bounded by `request_timeout_s`)."""
        msg = [pickle.dumps(header), *frames]
        timeout = self.config.request_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._socks[i].send_multipart(msg, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                rc = self.processes[i].poll()
                if rc is not None:
                    raise self._fail(
                        i,
                        f"{self._describe(i)} exited with code {rc} before taking a "
                        f"{header.get('op')!r} message; log tail:\n{self._log_tail(i)}",
                    ) from None
                if time.monotonic() > deadline:
                    raise self._fail(
                        i,
                        f"{self._describe(i)} took no {header.get('op')!r} message "
                        f"within {timeout:g} s",
                        True,
                    ) from None
                self._socks[i].poll(POLL_MS, zmq.POLLOUT)
            except zmq.ZMQError as e:
                raise self._fail(i, f"{self._describe(i)}: send failed: {e}") from e

    def _gather(
        self,
        indices: Iterable[int],
        deadline: float,
        what: str,
        timeout_s: float,
        seq: int | None,
    ) -> list[dict]:
        """One reply (with this `seq`) from each replica in `indices`, in that order."""
        order = list(indices)
        pending = list(order)
        replies: dict[int, dict] = {}
        poller = zmq.Poller()
        for i in pending:
            poller.register(self._socks[i], zmq.POLLIN)
        while pending:
            ready = dict(poller.poll(POLL_MS))
            for i in list(pending):
                if self._socks[i] in ready:
                    header = pickle.loads(self._socks[i].recv_multipart()[0])
                    if header.get("seq") != seq:
                        continue  # a late answer to a request we gave up on
                    if not header.get("ok", False):
                        raise self._fail(
                            i, f"{self._describe(i)} failed during {what}:\n{header['error']}"
                        )
                    replies[i] = header
                    pending.remove(i)
                    poller.unregister(self._socks[i])
                    continue
                rc = self.processes[i].poll()
                if rc is not None:
                    raise self._fail(
                        i,
                        f"{self._describe(i)} exited with code {rc} during {what}; "
                        f"log tail:\n{self._log_tail(i)}",
                    )
            if pending and time.monotonic() > deadline:
                names = ", ".join(self._describe(i) for i in pending)
                for i in pending:
                    self._fail(i, f"no answer during {what} within {timeout_s:g} s", True)
                raise RolloutTimeoutError(
                    f"{names}: no answer during {what} within {timeout_s:g} s"
                )
        return [replies[i] for i in order]

    def _start_collective(self) -> None:
        """Build the private process group (trainer rank 0, replica i rank i + 1)."""
        cfg, n = self.config, self.num_replicas
        backend = collective_backend(cfg.sync_backend)
        store = CollectiveChannel.host_store(
            cfg.replica_host, cfg.sync_port, n + 1, cfg.start_timeout_s
        )
        thread, result = CollectiveChannel.build_in_thread(
            store, 0, n + 1, backend, cfg.sync_timeout_s
        )
        what = f"collective channel set-up ({backend}, {cfg.replica_host}:{store.port})"
        seq = self._next_seq()
        for i in range(n):
            self._send(
                i,
                {
                    "op": "collective_init",
                    "seq": seq,
                    "host": cfg.replica_host,
                    "port": store.port,
                    "rank": i + 1,
                    "world_size": n + 1,
                    "backend": backend,
                    "store_timeout_s": cfg.start_timeout_s,
                    "timeout_s": cfg.sync_timeout_s,
                },
            )
        deadline = time.monotonic() + cfg.start_timeout_s
        self._gather(range(n), deadline, what, cfg.start_timeout_s, seq)
        thread.join(max(0.0, deadline - time.monotonic()))
        if "error" in result:
            raise RolloutError(f"{what} failed on the trainer: {result['error']}")
        if "channel" not in result:
            raise RolloutTimeoutError(f"{what}: trainer side not done in {cfg.start_timeout_s:g} s")
        self._channel = result["channel"]

    def _finish_sends(self, works: list, what: str) -> None:
        """Complete the trainer's side of a collective send. Called after every target acked
        the bucket, so the bytes have arrived and this returns at once; the backend's own
        timeout (`sync_timeout_s` at pool start) bounds it anyway. (Gloo point-to-point works
        report completion only through `wait`, so there is nothing to poll.)"""
        for w in works:
            try:
                w.wait()
            except RuntimeError as e:
                raise RolloutError(f"collective send during {what} failed: {e}") from e

    def _break_collective(self, error: RolloutError) -> RolloutError:
        """A member failed mid-sync: the group is unusable for everyone, and so is the pool."""
        note = (
            "the collective weight-sync channel is broken (a member failed during a collective "
            "sync): this pool is unusable now, build a new one"
        )
        for i in range(self.num_replicas):
            self._failed.setdefault(i, note)
            self._versions[i] = None
        return type(error)(f"{error}\n{note}")

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ----------------------------------------------------------------------- engine API

    @property
    def num_replicas(self) -> int:
        return len(self.processes)

    @property
    def weight_versions(self) -> list[int | None]:
        """Per replica; None where a sync failed half-way."""
        return list(self._versions)

    @property
    def weight_version(self) -> int:
        versions = set(self._versions)
        if len(versions) != 1 or None in versions:
            raise StaleWeightsError(
                f"replicas serve different weight versions: {self._versions} (per replica)"
            )
        return self._versions[0]  # type: ignore[return-value]

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def generate(
        self, requests: Sequence[RolloutRequest], expected_version: int | None = None
    ) -> RolloutBatch:
        """Split `requests` over the replicas (contiguous chunks) and gather samples in order.

        Refused before anything is sent when a prompt is too long, when the replicas serve
        different weight versions, or when their version is not `expected_version`.
        """
        vllm_engine.check_prompt_lengths(requests, self.max_model_len)
        self._check_usable(range(self.num_replicas))
        version = self.weight_version  # raises on mixed versions
        if expected_version is not None and version != expected_version:
            raise StaleWeightsError(
                f"replicas serve weight version {version}, the trainer expects "
                f"{expected_version}: sync weights first"
            )
        seq = self._next_seq()
        chunks = _split(len(requests), self.num_replicas)
        used = [i for i, c in enumerate(chunks) if len(c)]
        for i in used:
            self._send(
                i,
                {
                    "op": "generate",
                    "seq": seq,
                    "prompt_ids": list(chunks[i]),
                    "requests": [requests[j] for j in chunks[i]],
                },
            )
        timeout = self.config.request_timeout_s
        replies = self._gather(used, time.monotonic() + timeout, "generate", timeout, seq)
        samples: list[Sample] = [s for r in replies for s in r["samples"]]
        return RolloutBatch.from_samples(samples, expected_version)

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[list[float]]]:
        """Every replica's prompt log-probs on the same sequences: [replica][sequence][t-1]."""
        self._check_usable(range(self.num_replicas))
        seq = self._next_seq()
        seqs = [list(map(int, s)) for s in sequences]
        for i in range(self.num_replicas):
            self._send(i, {"op": "prompt_logprobs", "seq": seq, "sequences": seqs})
        timeout = self.config.request_timeout_s
        replies = self._gather(
            range(self.num_replicas), time.monotonic() + timeout, "prompt_logprobs", timeout, seq
        )
        return [r["logprobs"] for r in replies]

    def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        version: int,
        replicas: Sequence[int] | None = None,
    ) -> SyncReport:
        """Stream `weights` to every replica (or the given subset) in buckets of at most
        `config.bucket_mb`, then set their weight version to `version`.

        The whole sync must finish within `config.sync_timeout_s`. Syncing a subset (a rolling
        update) leaves the pool refusing to generate until all replicas agree again.
        """
        targets = list(range(self.num_replicas) if replicas is None else replicas)
        self._check_usable(targets)
        current = [v for v in (self._versions[i] for i in targets) if v is not None]
        if current and version <= max(current):
            raise ValueError(
                f"weight version must increase: replicas have {current}, got {version}"
            )
        timeout = self.config.sync_timeout_s
        t0 = time.monotonic()
        deadline = t0 + timeout
        seq = self._next_seq()
        for i in targets:
            self._versions[i] = None  # unknown until this sync completes
            self._send(
                i, {"op": "sync_begin", "seq": seq, "new_version": version, "timeout_s": timeout}
            )
        self._gather(targets, deadline, f"weight sync v{version} (begin)", timeout, seq)
        num_tensors = num_bytes = num_buckets = 0
        channel = self._channel
        # Collective: a broadcast when every replica takes part, point-to-point to a subset.
        ranks = (
            None if sorted(targets) == list(range(self.num_replicas)) else [i + 1 for i in targets]
        )
        device = channel.device if channel is not None else "cpu"
        try:
            for bucket in iter_buckets(weights, self.config.bucket_bytes, device):
                what = f"weight sync v{version} (bucket {num_buckets})"
                num_buckets += 1
                num_tensors += len(bucket)
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                if channel is None:
                    header, frames = encode_bucket(bucket)
                    del bucket
                    for i in targets:
                        self._send(i, {**header, "seq": seq}, frames)
                    self._gather(targets, deadline, what, timeout, seq)
                    del frames  # one bucket alive at a time
                    continue
                header, flat = pack_bucket(bucket, device)
                del bucket  # the flat copy is the bucket now
                header["broadcast"] = ranks is None
                for i in targets:
                    self._send(i, {**header, "seq": seq})
                works = channel.send(flat, ranks) if header["nbytes"] else []
                self._gather(targets, deadline, what, timeout, seq)
                self._finish_sends(works, what)
                del flat, works
        except RolloutError as e:
            if channel is not None:
                raise self._break_collective(e) from e
            raise
        for i in targets:
            self._send(i, {"op": "sync_end", "seq": seq})
        done = self._gather(targets, deadline, f"weight sync v{version} (reload)", timeout, seq)
        for i, reply in zip(targets, done, strict=True):
            self._versions[i] = reply["version"]
        return SyncReport(
            weight_version=version,
            num_tensors=num_tensors,
            num_bytes=num_bytes,
            num_buckets=num_buckets,
            seconds=time.monotonic() - t0,
            replica_seconds=tuple(r["reload_seconds"] for r in done),
        )

    def _broadcast(self, op: str) -> None:
        self._check_usable(range(self.num_replicas))
        seq = self._next_seq()
        for i in range(self.num_replicas):
            self._send(i, {"op": op, "seq": seq})
        timeout = self.config.request_timeout_s
        self._gather(range(self.num_replicas), time.monotonic() + timeout, op, timeout, seq)

    def sleep(self) -> None:
        """Free the replicas' GPU memory where vLLM supports it (no-op on CPU)."""
        self._broadcast("sleep")

    def wake_up(self) -> None:
        self._broadcast("wake_up")

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask each replica to exit, then kill whatever is still running after `timeout_s`."""
        seq = self._next_seq()
        for i, proc in enumerate(self.processes):
            if proc.poll() is None:
                with contextlib.suppress(zmq.ZMQError):
                    self._socks[i].send_multipart(
                        [pickle.dumps({"op": "shutdown", "seq": seq})], flags=zmq.NOBLOCK
                    )
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self._channel = None  # after the replicas left it (or were killed)
        for sock in self._socks:
            sock.close(0)
        self._socks = []
        self._ctx.term()
        if self._own_log_dir and not self._failed:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> ReplicaPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
