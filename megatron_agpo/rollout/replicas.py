"""Rollouts on separate vLLM processes ("replicas"), any number of them, on this node or others.

The trainer binds one ZMQ ROUTER socket on `config.bind_host` and the replicas
(`replica_worker`) connect to it: either processes the pool spawns itself
(`launch="spawn"`), or processes started separately, e.g. SLURM job steps on rollout nodes
(`launch="external"`), which find the trainer through the endpoint file the pool writes.
A replica introduces itself ("hello", with its index), receives the engine settings
("configure"), starts vLLM and says "ready". Prompts are split into contiguous chunks, one per
replica, and the samples gathered back in prompt order. Weights go over the same socket in
size-bounded buckets, broadcast to every replica, the next bucket only after every replica
has consumed the previous one: the trainer holds one bucket, each replica one bucket.

The channel is safe on a routable interface (`wire`): every connection is ZMQ CURVE with keys
derived from the run's secret, so a process without the secret is refused (and logged), can
inject nothing and receives nothing; headers are JSON, tensors raw bytes; nothing is
unpickled.

Every wait has a deadline, and a replica is watched while the trainer waits on it: a spawned
replica whose process exits is noticed within a poll tick, and any replica that sends no
heartbeat for `heartbeat_timeout_s` (stopped, hung, its node gone) is reported then, however
long its request may still run; a slow but alive replica keeps sending heartbeats from its
own thread. A replica that failed once is not used again (its state is unknown); build a new
pool.

With `config.sync_channel="collective"`, the bucket headers still go over ZMQ but each
bucket's bytes go as one flat tensor over a private process group (trainer rank 0 plus the
replicas; gloo on CPU, NCCL with CUDA) built at pool start over the pool's own TCPStore
(bound on `bind_host` only), never through `init_process_group`: a trainer's default group is
left alone. On gloo each bucket's bytes carry an HMAC (in the authenticated header) that the
replica checks before vLLM sees them. A member that fails during a collective sync breaks the
group, so the whole pool is then unusable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import zmq

from megatron_agpo.registry import require_valid
from megatron_agpo.rollout import vllm_engine, wire
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
from megatron_agpo.rollout.wire import request_to_json, sample_from_json

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
    """`RolloutEngine` over `config.num_replicas` vLLM worker processes.

    `log_dir`: spawned replicas' logs (kept when given, or when a replica failed).
    `endpoint_file`: with `launch="external"`, where the trainer's {"host", "port"} is written
    for the replicas (default `log_dir/../rollout_endpoint.json`, i.e. the run folder); it is
    removed again by `close`.
    """

    def __init__(
        self,
        config: RolloutConfig,
        log_dir: str | Path | None = None,
        endpoint_file: str | Path | None = None,
    ) -> None:
        if not config.model_path:
            raise ValueError("rollout.engine.model_path is empty")
        require_valid(config, "rollout.engine.")
        self.config = config
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="agpo_replicas_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint_file = Path(endpoint_file or self.log_dir.parent / "rollout_endpoint.json")
        n = config.num_replicas
        self.processes: list[subprocess.Popen | None] = [None] * n
        """Spawned replicas' processes (None for external ones)."""
        self.replica_info: list[dict] = [{} for _ in range(n)]
        """What each replica said in its hello (pid, host)."""
        self._peers: list[bytes | None] = [None] * n  # ZMQ routing id of each replica
        self._index_of: dict[bytes, int] = {}
        self._inbox: list[list[dict]] = [[] for _ in range(n)]
        self._last_seen = [0.0] * n
        self._versions: list[int | None] = [None] * n
        self._failed: dict[int, str] = {}
        self._seq = 0
        # Overlapped generation (`submit` / `collect`): the replicas of each outstanding
        # request, replies that arrived while the pool waited on something else, and each
        # replica's idle seconds since start (as it last reported them).
        self._outstanding: dict[int, list[int]] = {}
        self._stash: dict[tuple[int, int], dict] = {}
        self.replica_idle_s: list[float] = [0.0] * n
        self._channel: CollectiveChannel | None = None
        self._accepting = True
        self._wrote_endpoint = False
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._auth: wire.Authenticator | None = None
        try:
            if config.secret_file:
                secret = wire.read_secret(config.secret_file)
            else:
                secret = wire.new_secret()
            self._secret = secret
            self._digest_key = wire.digest_key(secret)
            self._keys = wire.curve_keys(secret)
            self.host = wire.resolve_host(config.bind_host)
            self._sock, self.port, self._auth = wire.bind_server(
                self._ctx, self.host, 0, self._keys
            )
            self.endpoint = wire.tcp_endpoint(self.host, self.port)
            t0 = time.monotonic()
            if config.launch == "spawn":
                for i in range(n):
                    self._spawn(i)
                connect_s = config.start_timeout_s
            else:
                wire.write_endpoint(self.endpoint_file, self.host, self.port)
                self._wrote_endpoint = True
                connect_s = config.connect_timeout_s
            self._wait_connected(t0 + connect_s, connect_s)
            self._accepting = False
            ready = self._gather(
                range(n),
                time.monotonic() + config.start_timeout_s,
                "start-up",
                config.start_timeout_s,
                seq=0,
            )
            self._versions = [h["version"] for h in ready]
            if config.sync_channel == "collective":
                self._start_collective()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- process plumbing

    @property
    def refused(self) -> list[str]:
        """Connections refused so far (no or wrong key, not a ZMQ CURVE peer)."""
        return list(self._auth.refused) if self._auth is not None else []

    def _spawn(self, i: int) -> None:
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        env.pop(wire.SECRET_ENV, None)
        # The secret goes through a pipe the child reads once: not the command line (every
        # user sees it in `ps`), not the environment (/proc/PID/environ keeps it for the
        # process's life, whatever the child removes from os.environ).
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, self._secret.hex().encode())  # 64 bytes: fits the pipe buffer
        finally:
            os.close(write_fd)
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
            self.endpoint,
            "--replica-index",
            str(i),
            "--parent-pid",
            str(os.getpid()),
            "--secret-fd",
            str(read_fd),
        ]
        try:
            self.processes[i] = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(read_fd,)
            )
        finally:
            os.close(read_fd)
            log.close()

    def _describe(self, i: int) -> str:
        proc, info = self.processes[i], self.replica_info[i]
        if proc is not None:
            return f"replica {i} (pid {proc.pid})"
        if info:
            return f"replica {i} (pid {info.get('pid')} on {info.get('host')})"
        return f"replica {i}"

    def _log_tail(self, i: int) -> str:
        if self.processes[i] is None:
            return "(an external replica: see its own log)"
        try:
            text = (self.log_dir / f"replica_{i}.log").read_text(errors="replace")
        except OSError:
            return ""
        return text[-LOG_TAIL_CHARS:]

    def _fail(self, i: int, message: str, timeout: bool = False) -> RolloutError:
        self._failed[i] = message
        self._versions[i] = None
        cls = RolloutTimeoutError if timeout else RolloutError
        return cls(message)

    def _check_usable(self, indices: Iterable[int]) -> None:
        for i in indices:
            if i in self._failed:
                raise RolloutError(f"{self._describe(i)} failed earlier: {self._failed[i]}")

    def _send_to(self, peer: bytes, header: dict, frames: Sequence = ()) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart([peer, *wire.encode(header, frames)], flags=zmq.NOBLOCK)

    def _pump(self, timeout_ms: int) -> None:
        """Read every message that arrives within `timeout_ms` (or is already queued):
        hellos and heartbeats are handled here, replies go to their replica's inbox."""
        while self._sock.poll(timeout_ms):
            timeout_ms = 0
            peer, *frames = self._sock.recv_multipart()
            try:
                header = wire.decode_header(frames[0]) if frames else {}
            except wire.WireError as e:  # an authenticated peer, so a bug: say so, go on
                print(f"replica channel: dropped a message: {e}", file=sys.stderr)
                continue
            op = header.get("op")
            i = header.get("replica")
            if not isinstance(i, int) or not 0 <= i < self.num_replicas:
                self._send_to(peer, {"op": "reject", "error": f"no replica index {i!r} here"})
                continue
            if op == "heartbeat":
                self._last_seen[i] = time.monotonic()
            elif op == "hello":
                self._hello(i, peer, header)
            elif self._index_of.get(peer) == i:
                self._last_seen[i] = time.monotonic()
                if isinstance(header.get("idle_s"), (int, float)):
                    self.replica_idle_s[i] = float(header["idle_s"])
                self._inbox[i].append(header)

    def _hello(self, i: int, peer: bytes, header: dict) -> None:
        if not self._accepting or self._peers[i] is not None:
            why = "the pool has started" if not self._accepting else "it is already connected"
            print(
                f"replica channel: refused a second replica {i} from {header.get('host')} "
                f"(pid {header.get('pid')}): {why}",
                file=sys.stderr,
            )
            self._send_to(peer, {"op": "reject", "error": f"replica {i}: {why}"})
            return
        self._peers[i] = peer
        self._index_of[peer] = i
        self.replica_info[i] = {"pid": header.get("pid"), "host": header.get("host")}
        self._last_seen[i] = time.monotonic()
        self._send_to(peer, {"op": "configure", "seq": 0, "config": self.config.to_dict()})

    def _wait_connected(self, deadline: float, timeout_s: float) -> None:
        while None in self._peers:
            self._pump(POLL_MS)
            for i in range(self.num_replicas):
                if self._peers[i] is None:
                    self._check_process(i, "start-up")
            if None in self._peers and time.monotonic() > deadline:
                missing = [i for i, p in enumerate(self._peers) if p is None]
                where = (
                    f"; they find the trainer through {self.endpoint_file}"
                    if self.config.launch == "external"
                    else ""
                )
                refused = f"; refused connections: {self.refused[:3]}" if self.refused else ""
                raise RolloutTimeoutError(
                    f"replicas {missing} did not connect to {self.endpoint} within "
                    f"{timeout_s:g} s{where}{refused}"
                )

    def _check_process(self, i: int, what: str) -> None:
        proc = self.processes[i]
        rc = proc.poll() if proc is not None else None
        if rc is not None:
            raise self._fail(
                i,
                f"{self._describe(i)} exited with code {rc} during {what}; "
                f"log tail:\n{self._log_tail(i)}",
            )

    def _check_alive(self, i: int, what: str, wait_start: float) -> None:
        """Raise if replica i exited or has been silent for `heartbeat_timeout_s` of this
        wait (time before the wait does not count: nothing was reading its heartbeats)."""
        self._check_process(i, what)
        silent = time.monotonic() - max(self._last_seen[i], wait_start)
        limit = self.config.heartbeat_timeout_s
        if silent > limit:
            raise self._fail(
                i,
                f"{self._describe(i)} sent no heartbeat for {silent:.0f} s during {what} "
                f"(heartbeat_timeout_s={limit:g}): stopped, hung, or its node is gone",
                True,
            )

    def _send(self, i: int, header: dict, frames: Sequence = ()) -> None:
        """Queue a message for replica i without blocking; while its queue is full, keep
        watching it (process, heartbeat), bounded by `request_timeout_s`."""
        msg = [self._peers[i], *wire.encode(header, frames)]
        timeout = self.config.request_timeout_s
        start = time.monotonic()
        what = f"sending {header.get('op')!r}"
        while True:
            try:
                self._sock.send_multipart(msg, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                self._check_alive(i, what, start)
                if time.monotonic() > start + timeout:
                    raise self._fail(
                        i,
                        f"{self._describe(i)} took no {header.get('op')!r} message "
                        f"within {timeout:g} s",
                        True,
                    ) from None
                self._pump(POLL_MS // 4)
            except zmq.ZMQError as e:
                if e.errno == errno.EHOSTUNREACH:  # the connection is gone
                    proc = self.processes[i]
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        if proc is not None:
                            proc.wait(timeout=2)
                    self._check_process(i, what)
                    raise self._fail(i, f"{self._describe(i)} disconnected before {what}") from None
                raise self._fail(i, f"{self._describe(i)}: send failed: {e}") from e

    def _take(self, i: int, seq: int | None) -> dict | None:
        """Replica i's reply with this `seq`, if it arrived (late replies to requests we gave
        up on are dropped)."""
        if (i, seq) in self._stash:
            return self._stash.pop((i, seq))
        inbox = self._inbox[i]
        while inbox:
            header = inbox.pop(0)
            if header.get("seq") == seq:
                return header
            if header.get("seq") in self._outstanding:  # a submitted request's: kept
                self._stash[(i, header["seq"])] = header
        return None

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
        start = time.monotonic()
        # First a look without waiting: a reply may have been read already (a submitted
        # batch's, stashed while a weight sync waited), and the next message may be a
        # heartbeat 5 s away.
        wait_ms = 0
        while pending:
            self._pump(wait_ms)
            wait_ms = POLL_MS
            for i in list(pending):
                header = self._take(i, seq)
                if header is None:
                    self._check_alive(i, what, start)
                    continue
                if not header.get("ok", False):
                    raise self._fail(
                        i, f"{self._describe(i)} failed during {what}:\n{header.get('error')}"
                    )
                replies[i] = header
                pending.remove(i)
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
        store = CollectiveChannel.host_store(self.host, cfg.sync_port, n + 1, cfg.start_timeout_s)
        prefix = wire.store_prefix(self._secret)
        thread, result = CollectiveChannel.build_in_thread(
            store, 0, n + 1, backend, cfg.sync_timeout_s, prefix, self.host
        )
        what = f"collective channel set-up ({backend}, {self.host}:{store.port})"
        seq = self._next_seq()
        for i in range(n):
            self._send(
                i,
                {
                    "op": "collective_init",
                    "seq": seq,
                    "host": self.host,
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
        return len(self._peers)

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
        seq, used = self._send_generate(requests)
        timeout = self.config.request_timeout_s
        replies = self._gather(used, time.monotonic() + timeout, "generate", timeout, seq)
        samples: list[Sample] = [sample_from_json(s) for r in replies for s in r["samples"]]
        return RolloutBatch.from_samples(samples, expected_version)

    def submit(self, requests: Sequence[RolloutRequest], partial: str = "finish") -> int:
        """Start sampling `requests` and return at once (overlapped generation): a ticket for
        `collect`. The replicas take it in order behind whatever they already have; a weight
        sync sent later reaches them after it (partial="finish": the request ends under the
        weights it started with) or interrupts it (partial="resume": the sync loads, the
        responses continue under the new weights; every token keeps the version and the
        log-prob of the weights that sampled it). No version check here: `collect` returns
        what each sample's tokens were sampled with, and the trainer bounds the staleness."""
        if partial not in ("finish", "resume"):
            raise ValueError(f"partial={partial!r}: must be 'finish' or 'resume'")
        vllm_engine.check_prompt_lengths(requests, self.max_model_len)
        self._check_usable(range(self.num_replicas))
        seq, used = self._send_generate(requests, partial=partial)
        self._outstanding[seq] = used
        return seq

    def _send_generate(
        self, requests: Sequence[RolloutRequest], **extra: str
    ) -> tuple[int, list[int]]:
        """Split `requests` over the replicas and send each its share under a new seq; (seq,
        the replicas that got a share)."""
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
                    "requests": [request_to_json(requests[j]) for j in chunks[i]],
                    **extra,
                },
            )
        return seq, used

    def collect(self, ticket: int) -> RolloutBatch:
        """The samples of a `submit`ted request, in prompt order, waiting for them (bounded
        by `request_timeout_s` from now); they may mix weight versions."""
        used = self._outstanding[ticket]
        timeout = self.config.request_timeout_s
        try:
            replies = self._gather(used, time.monotonic() + timeout, "generate", timeout, ticket)
        finally:
            self._outstanding.pop(ticket, None)
        samples: list[Sample] = [sample_from_json(s) for r in replies for s in r["samples"]]
        return RolloutBatch.from_samples(samples, allow_mixed=True)

    def cancel(self, ticket: int) -> None:
        """Forget a submitted request (its replies are dropped when they arrive)."""
        self._outstanding.pop(ticket, None)
        for key in [k for k in self._stash if k[1] == ticket]:
            del self._stash[key]

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
                if flat.device.type == "cpu":
                    # Gloo bytes are not authenticated on their way; the header is.
                    header["digest"] = wire.bytes_digest(self._digest_key, flat.numpy())
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
        """Ask each replica to exit, then kill spawned ones still running after `timeout_s`.
        External replicas exit on the request, or by themselves once the trainer is gone."""
        if self._sock is not None:
            for peer in self._peers:
                if peer is not None:
                    self._send_to(peer, {"op": "shutdown", "seq": -1})
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if self._sock is not None and self.config.launch == "external":
            # Give external replicas a moment to take the shutdown before the socket goes.
            with contextlib.suppress(RolloutError):
                live = [i for i, p in enumerate(self._peers) if p and i not in self._failed]
                self._gather(live, time.monotonic() + min(timeout_s, 5.0), "shutdown", 5.0, -1)
        self._channel = None  # after the replicas left it (or were killed)
        if self._wrote_endpoint:
            with contextlib.suppress(OSError):
                self.endpoint_file.unlink()
            self._wrote_endpoint = False
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if not self._ctx.closed:
            self._ctx.term()
        if self._own_log_dir and not self._failed:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> ReplicaPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
