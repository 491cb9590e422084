"""One rollout replica: a process that owns a `vllm.LLM` and serves the trainer over ZMQ.

Started by `ReplicaPool` as `python -m megatron_agpo.rollout.replica_worker --connect ADDR
--index I --config JSON --parent-pid PID`. It connects a DEALER socket to the address the
trainer bound, says hello once the engine is up, then answers one message at a time.

Wire format (both ways): frame 0 is a pickled header dict with "op" and "seq" (the reply
echoes "seq" so the trainer can drop late answers); weight buckets carry each tensor's raw
bytes in the following frames. The channel is meant for a trusted network (pickle).

A weight sync is one `reload_weights` call fed by a generator that pulls buckets from the
socket: the worker holds one bucket at a time, and acknowledges a bucket only after vLLM has
consumed its tensors, which paces the trainer. With the collective channel
(`collective_init`, sent once at pool start), a bucket header carries "nbytes" and no byte
frames: the bytes arrive as one flat tensor over the private process group (rank = index + 1),
received into a buffer of that size, and vLLM gets views into it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
import traceback
from collections.abc import Iterator

import zmq

from megatron_agpo.rollout import vllm_engine
from megatron_agpo.rollout.config import RolloutConfig
from megatron_agpo.rollout.weight_sync import CollectiveChannel, decode_bucket, unpack_bucket

POLL_MS = 500


class SyncAborted(RuntimeError):
    pass


class Worker:
    def __init__(self, connect: str, index: int, config: RolloutConfig, parent_pid: int):
        self.index = index
        self.config = config
        self.parent_pid = parent_pid
        self.llm = vllm_engine.build_llm(config, seed=config.seed + index)
        self.version: int | None = 0  # None: a sync failed half-way, weights are unknown
        self.pending: list | None = None  # a message read while a sync was being aborted
        self.channel: CollectiveChannel | None = None
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(connect)

    def send(self, header: dict, seq: int | None) -> None:
        header = {**header, "seq": seq, "version": self.version, "replica": self.index}
        self.sock.send_multipart([pickle.dumps(header)])

    def parent_alive(self) -> bool:
        # Reparented (to init or a subreaper) once the trainer is gone.
        return os.getppid() == self.parent_pid

    def recv(self, timeout_s: float | None) -> list:
        """Next message; raises if the trainer is gone or `timeout_s` passes."""
        if self.pending is not None:
            msg, self.pending = self.pending, None
            return msg
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.sock.poll(POLL_MS):
            if not self.parent_alive():
                raise SystemExit(f"replica {self.index}: trainer process is gone, exiting")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.index}: no message within {timeout_s:.0f} s")
        return self.sock.recv_multipart(copy=False)

    def serve(self) -> None:
        self.send({"op": "hello", "ok": True, "pid": os.getpid()}, None)
        while True:
            frames = self.recv(None)
            header = pickle.loads(frames[0].bytes)
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
            samples = vllm_engine.run_generate(
                self.llm, header["requests"], header["prompt_ids"], self.version
            )
            return {"ok": True, "samples": samples}
        if op == "prompt_logprobs":
            return {
                "ok": True,
                "logprobs": vllm_engine.run_prompt_logprobs(self.llm, header["sequences"]),
            }
        if op == "sync_begin":
            return self.sync(header)
        if op == "collective_init":
            store = CollectiveChannel.connect_store(
                header["host"], header["port"], header["world_size"], header["store_timeout_s"]
            )
            self.channel = CollectiveChannel(
                store, header["rank"], header["world_size"], header["backend"], header["timeout_s"]
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

    def sync(self, header: dict) -> dict:
        timeout_s = float(header["timeout_s"])
        seq = header["seq"]
        self.send({"op": "sync_ready", "ok": True}, seq)

        def tensors() -> Iterator:
            while True:
                frames = self.recv(timeout_s)
                h = pickle.loads(frames[0].bytes)
                if h["op"] == "sync_end":
                    return
                if h["op"] != "bucket":
                    # The trainer gave up on this sync and moved on: keep its message.
                    self.pending = frames
                    raise SyncAborted(f"sync aborted by a {h['op']!r} message")
                if "nbytes" in h:  # collective channel: the bytes come over the process group
                    if self.channel is None:
                        raise RuntimeError("collective bucket, but no collective channel")
                    flat = self.channel.recv(h["nbytes"], h["broadcast"])
                    yield from unpack_bucket(h, flat)
                    del flat  # vLLM copied the views: the buffer goes with this bucket
                else:
                    yield from decode_bucket(h, [f.buffer for f in frames[1:]])
                # Every tensor of the bucket is in vLLM now: ask for the next one.
                self.send({"op": "bucket_ack", "ok": True}, h["seq"])

        self.version = None
        seconds = vllm_engine.reload_weights(self.llm, tensors())
        self.version = int(header["new_version"])
        return {"ok": True, "reload_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config", required=True, help="RolloutConfig as JSON")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args()
    config = RolloutConfig(**json.loads(args.config))
    worker = Worker(args.connect, args.index, config, args.parent_pid)
    try:
        worker.serve()
    finally:
        worker.sock.close(0)
    sys.exit(0)


if __name__ == "__main__":
    main()
