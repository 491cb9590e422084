"""One rollout replica: a process that owns a `vllm.LLM` and serves the trainer over ZMQ.

Spawned by `ReplicaPool` (`launch="spawn"`) as
`python -m megatron_agpo.rollout.replica_worker --connect ENDPOINT --replica-index I
--parent-pid PID` with the run's secret in its environment, or started separately
(`launch="external"`, e.g. a SLURM job step on a rollout node) as
`python -m megatron_agpo.rollout.replica_worker --connect-file FILE --secret-file FILE
--replica-index I`: it waits for the trainer's endpoint file, connects, says hello, and
receives the engine settings from the trainer over the authenticated channel.

Wire format (both ways, `wire`): ZMQ CURVE with keys derived from the run's secret; frame 0
is a JSON header with "op" and "seq" (the reply echoes "seq" so the trainer can drop late
answers); weight buckets carry each tensor's raw bytes in the following frames, described by
dtype and shape in the header. Nothing is unpickled.

Liveness, both ways: a thread of its own sends a heartbeat every `heartbeat_s` on a second
connection (so a long generation does not delay it; a SIGSTOPped or hung replica sends none),
and exits the process when that connection has been down for `heartbeat_timeout_s` (the
trainer died or its node is unreachable; libzmq's own pings detect a hung trainer host). A
spawned replica also dies with its parent (PR_SET_PDEATHSIG).

A weight sync is one `reload_weights` call fed by a generator that pulls buckets from the
socket: the worker holds one bucket at a time, and acknowledges a bucket only after vLLM has
consumed its tensors, which paces the trainer. With the collective channel
(`collective_init`, sent once at pool start), a bucket header carries "nbytes" and no byte
frames: the bytes arrive as one flat tensor over the private process group (rank = index + 1),
received into a buffer of that size (checked against the header's HMAC on gloo), and vLLM gets
views into it.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import zmq

from megatron_agpo.launcher import leave
from megatron_agpo.rollout import vllm_engine, wire
from megatron_agpo.rollout.config import RolloutConfig
from megatron_agpo.rollout.weight_sync import CollectiveChannel, decode_bucket, unpack_bucket

POLL_MS = 500
EXIT_REFUSED = 2
"""Exit code: the trainer refused this replica (index taken or out of range), or the
handshake failed (another run's secret), or no trainer appeared within --wait-s."""
EXIT_TRAINER_GONE = 3
"""Exit code: the trainer stopped answering (died, or its node is unreachable)."""


class SyncAborted(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the trainer that spawned it exits (Linux).

    The signal is tied to the thread that forked us: the pool is built on the trainer's main
    thread."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        _say("replica: the trainer that spawned this replica is gone, exiting")
        sys.exit(EXIT_TRAINER_GONE)


class Heartbeat(threading.Thread):
    """Sends a heartbeat every `heartbeat_s` on its own connection; ends the process when the
    trainer has been unreachable for `heartbeat_timeout_s` (or the spawning trainer exited)."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        keys: wire.CurveKeys,
        index: int,
        config: RolloutConfig,
        parent_pid: int,
    ) -> None:
        super().__init__(name="agpo-heartbeat", daemon=True)
        self.sock = wire.connect_client(
            ctx, endpoint, keys, config.heartbeat_s, config.heartbeat_timeout_s
        )
        self.watch = wire.ConnectionWatch(self.sock)
        self.msg = wire.encode({"op": "heartbeat", "replica": index})
        self.interval = config.heartbeat_s
        self.timeout = config.heartbeat_timeout_s
        self.index = index
        self.parent_pid = parent_pid

    def run(self) -> None:
        while True:
            if self.watch.update():
                # Queue full: the trainer reads heartbeats only while it waits on replicas.
                with contextlib.suppress(zmq.Again):
                    self.sock.send_multipart(self.msg, flags=zmq.NOBLOCK)
            elif time.monotonic() - self.watch.since > self.timeout:
                _say(
                    f"replica {self.index}: the trainer has been unreachable for "
                    f"{self.timeout:g} s (heartbeat_timeout_s), exiting"
                )
                os._exit(EXIT_TRAINER_GONE)
            if self.parent_pid and os.getppid() != self.parent_pid:
                _say(f"replica {self.index}: the trainer process is gone, exiting")
                os._exit(EXIT_TRAINER_GONE)
            time.sleep(self.interval)


def introduce(
    ctx: zmq.Context, args: argparse.Namespace, keys: wire.CurveKeys
) -> tuple[zmq.Socket, str, RolloutConfig]:
    """Connect to the trainer, say hello, return (socket, endpoint, engine settings).

    With --connect-file: waits for the file, and follows it when it changes (a trainer that
    restarted, e.g. a requeued job, writes a new port)."""
    deadline = time.monotonic() + args.wait_s
    routing_id = f"replica-{args.replica_index}-{secrets.token_hex(4)}".encode()
    hello = {
        "op": "hello",
        "replica": args.replica_index,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    while True:
        if args.connect:
            endpoint = args.connect
        else:
            found = wire.read_endpoint(args.connect_file)
            if found is None:
                if time.monotonic() > deadline:
                    _say(f"replica: no endpoint in {args.connect_file} after {args.wait_s:g} s")
                    sys.exit(EXIT_REFUSED)
                time.sleep(1.0)
                continue
            endpoint = wire.tcp_endpoint(*found)
        sock = wire.connect_client(ctx, endpoint, keys, routing_id=routing_id)
        watch = wire.ConnectionWatch(sock)
        sock.send_multipart(wire.encode(hello))
        _say(f"replica {args.replica_index}: connecting to {endpoint}")
        while True:
            if sock.poll(POLL_MS):
                header = wire.decode_header(sock.recv_multipart()[0])
                if header["op"] == "configure":
                    watch.close()
                    return sock, endpoint, RolloutConfig(**header["config"])
                if header["op"] == "reject":
                    _say(f"replica {args.replica_index}: refused by the trainer: {header['error']}")
                    sys.exit(EXIT_REFUSED)
            watch.update()
            if watch.handshake_failures >= 3 and not watch.connected:
                _say(
                    f"replica {args.replica_index}: the CURVE handshake with {endpoint} failed "
                    f"{watch.handshake_failures} times: is it another run's trainer (another "
                    "secret)?"
                )
                sys.exit(EXIT_REFUSED)
            if time.monotonic() > deadline:
                _say(f"replica {args.replica_index}: {endpoint} silent for {args.wait_s:g} s")
                sys.exit(EXIT_REFUSED)
            if args.connect_file and wire.read_endpoint(args.connect_file) not in (None, found):
                break  # a new trainer: reconnect to it
        watch.close()
        sock.close(0)


class Worker:
    def __init__(self, sock: zmq.Socket, index: int, config: RolloutConfig, secret: bytes) -> None:
        self.index = index
        self.config = config
        self.sock = sock
        self.digest_key = wire.digest_key(secret)
        self.store_prefix = wire.store_prefix(secret)
        self.llm = vllm_engine.build_llm(config, seed=config.seed + index)
        self.version: int | None = 0  # None: a sync failed half-way, weights are unknown
        self.pending: list | None = None  # a message read while a sync was being aborted
        self.backlog: list[tuple[dict, list]] = []  # read during a resumable generation
        self.idle_s = 0.0  # seconds spent waiting for work (reported in every reply)
        self.channel: CollectiveChannel | None = None

    def send(self, header: dict, seq: int | None) -> None:
        header = {**header, "seq": seq, "version": self.version, "replica": self.index,
                  "idle_s": self.idle_s}  # fmt: skip
        self.sock.send_multipart(wire.encode(header))

    def recv(self, timeout_s: float | None) -> tuple[dict, list]:
        """Next message (header, byte frames); raises if `timeout_s` passes. (A trainer that
        is gone ends the process from the heartbeat thread.)"""
        if self.pending is not None:
            msg, self.pending = self.pending, None
            return msg
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.sock.poll(POLL_MS):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.index}: no message within {timeout_s:.0f} s")
        frames = self.sock.recv_multipart(copy=False)
        return wire.decode_header(frames[0]), frames[1:]

    def serve(self) -> None:
        self.send({"op": "ready", "ok": True, "pid": os.getpid()}, 0)
        while True:
            if self.backlog:
                header, _ = self.backlog.pop(0)
            else:
                t0 = time.monotonic()
                header, _ = self.recv(None)
                self.idle_s += time.monotonic() - t0
            seq = header.get("seq")
            op = header["op"]
            if op == "shutdown":
                self.send({"op": op, "ok": True}, seq)
                return
            try:
                reply = self.handle(op, header)
            except SyncAborted as e:
                reply = {"ok": False, "error": str(e)}
            except Exception:  # noqa: BLE001 - reported to the trainer, which raises
                reply = {"ok": False, "error": traceback.format_exc()}
            self.send({"op": op, **reply}, seq)

    def handle(self, op: str, header: dict) -> dict:
        if op == "ping":
            return {"ok": True}
        if op == "generate":
            if self.version is None:
                raise RuntimeError("weights are unknown after a failed sync; sync again")
            requests = [wire.request_from_json(r) for r in header["requests"]]
            if header.get("partial") == "resume":
                samples = vllm_engine.run_generate_resumable(
                    self.llm, requests, header["prompt_ids"], lambda: self.version,
                    self.sync_between_steps,
                )  # fmt: skip
            else:
                samples = vllm_engine.run_generate(
                    self.llm, requests, header["prompt_ids"], self.version
                )
            return {"ok": True, "samples": [wire.sample_to_json(s) for s in samples]}
        if op == "prompt_logprobs":
            return {
                "ok": True,
                "logprobs": vllm_engine.run_prompt_logprobs(self.llm, header["sequences"]),
            }
        if op == "sync_begin":
            return self.sync(header)
        if op == "collective_init":
            host = header["host"]
            store = CollectiveChannel.connect_store(
                host, header["port"], header["world_size"], header["store_timeout_s"]
            )
            self.channel = CollectiveChannel(
                store,
                header["rank"],
                header["world_size"],
                header["backend"],
                header["timeout_s"],
                self.store_prefix,
                wire.local_address_towards(host),
            )
            return {"ok": True}
        if op == "sleep":
            if vllm_engine.sleep_mode_available() and self.config.enable_sleep_mode:
                self.llm.sleep(level=1)
            return {"ok": True}
        if op == "wake_up":
            if vllm_engine.sleep_mode_available() and self.config.enable_sleep_mode:
                self.llm.wake_up()
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    def sync_between_steps(self) -> bool:
        """Between two engine steps of a resumable generation: run a weight sync that has
        arrived (pause, load, resume: the in-flight requests continue under the new weights)
        and return True; any other message waits in the backlog for the serve loop."""
        synced = False
        while self.pending is None and self.sock.poll(0):
            frames = self.sock.recv_multipart(copy=False)
            header, rest = wire.decode_header(frames[0]), frames[1:]
            if header.get("op") != "sync_begin":
                self.backlog.append((header, rest))
                continue
            try:
                reply = self.sync(header)
            except SyncAborted as e:
                reply = {"ok": False, "error": str(e)}
            except Exception:  # noqa: BLE001 - reported to the trainer, which raises
                reply = {"ok": False, "error": traceback.format_exc()}
            self.send({"op": "sync_begin", **reply}, header.get("seq"))
            if self.version is None:
                raise RuntimeError("a weight sync failed during a generation; sync again")
            synced = True
        if self.pending is not None:  # what an aborted sync left: the serve loop's
            self.backlog.append(self.pending)
            self.pending = None
        return synced

    def sync(self, header: dict) -> dict:
        timeout_s = float(header["timeout_s"])
        seq = header["seq"]
        self.send({"op": "sync_ready", "ok": True}, seq)

        def tensors() -> Iterator:
            while True:
                h, frames = self.recv(timeout_s)
                if h["op"] == "sync_end":
                    return
                if h["op"] != "bucket":
                    # The trainer gave up on this sync and moved on: keep its message.
                    self.pending = (h, frames)
                    raise SyncAborted(f"sync aborted by a {h['op']!r} message")
                if "nbytes" in h:  # collective channel: the bytes come over the process group
                    if self.channel is None:
                        raise RuntimeError("collective bucket, but no collective channel")
                    flat = self.channel.recv(int(h["nbytes"]), bool(h["broadcast"]))
                    if "digest" in h:
                        got = wire.bytes_digest(self.digest_key, flat.numpy())
                        if not hmac.compare_digest(got, str(h["digest"])):
                            raise RuntimeError(
                                "a collective bucket's bytes failed their HMAC check (altered "
                                "or injected on the way): sync refused"
                            )
                    yield from unpack_bucket(h, flat)
                    del flat  # vLLM copied the views: the buffer goes with this bucket
                else:
                    yield from decode_bucket(h, [f.buffer for f in frames])
                # Every tensor of the bucket is in vLLM now: ask for the next one.
                self.send({"op": "bucket_ack", "ok": True}, h["seq"])

        self.version = None
        seconds = vllm_engine.reload_weights(self.llm, tensors())
        self.version = int(header["new_version"])
        return {"ok": True, "reload_seconds": seconds}


def run_secret(args) -> bytes:
    """The run's secret: from the pipe the spawning trainer wrote it into (never in this
    process's environment, which /proc/PID/environ shows for its whole life), a file, or
    (external replicas started by hand) the environment."""
    if args.secret_fd is not None:
        try:
            with os.fdopen(args.secret_fd, "r") as f:
                text = f.read(4096)
        except OSError as e:
            raise wire.WireError(f"--secret-fd {args.secret_fd}: {e}") from None
        return wire.parse_secret(text, f"--secret-fd {args.secret_fd}")
    if args.secret_file:
        return wire.read_secret(args.secret_file)
    if os.environ.get(wire.SECRET_ENV):
        return wire.parse_secret(os.environ.pop(wire.SECRET_ENV), f"${wire.SECRET_ENV}")
    raise wire.WireError(f"no secret: give --secret-file or set ${wire.SECRET_ENV}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", help="the trainer's endpoint, tcp://HOST:PORT")
    where.add_argument(
        "--connect-file", type=Path, help='the trainer\'s endpoint file ({"host", "port"})'
    )
    parser.add_argument("--replica-index", type=int, required=True)
    parser.add_argument(
        "--secret-file",
        type=Path,
        help=f"the run's secret (hex, mode 600); default: ${wire.SECRET_ENV}",
    )
    parser.add_argument(
        "--secret-fd",
        type=int,
        help="a pipe holding the run's secret (hex), read once (spawned replicas)",
    )
    parser.add_argument(
        "--parent-pid", type=int, default=0, help="the spawning trainer's pid (spawn mode)"
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=3600.0,
        help="how long to wait for the endpoint file and the trainer's answer",
    )
    args = parser.parse_args()
    if args.parent_pid:
        die_with_parent(args.parent_pid)
        # Spawned by a rank: the rank decides when it stops (and it dies with the rank). A
        # scheduler's SIGTERM/SIGUSR1 to every process of the job is the rank's to act on
        # (finish the step, save); a replica that exited on it would fail that step.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    try:
        secret = run_secret(args)
    except wire.WireError as e:
        _say(f"replica {args.replica_index}: {e}")
        sys.exit(EXIT_REFUSED)
    keys = wire.curve_keys(secret)
    ctx = zmq.Context()
    sock, endpoint, config = introduce(ctx, args, keys)
    Heartbeat(ctx, endpoint, keys, args.replica_index, config, args.parent_pid).start()
    worker = Worker(sock, args.replica_index, config, secret)
    try:
        worker.serve()
    finally:
        sock.close(0)
    leave(0)  # shut down by the trainer, which waits for this process to end


if __name__ == "__main__":
    main()
