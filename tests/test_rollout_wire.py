"""The replica channel's wire without vLLM: the secret, CURVE refusal of peers without it,
JSON headers (never pickle), checked tensor specs, and which interface each socket listens on.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq

from megatron_agpo.rollout import RolloutRequest, Sample, wire
from megatron_agpo.rollout.weight_sync import (
    CollectiveChannel,
    decode_bucket,
    encode_bucket,
    pack_bucket,
    unpack_bucket,
)

ROOT = Path(__file__).resolve().parents[1]


def test_secret_file_is_private_hex(tmp_path):
    path = tmp_path / "secret"
    secret = wire.write_secret(path)
    assert len(secret) == 32 and os.stat(path).st_mode & 0o777 == 0o600
    assert wire.read_secret(path) == secret
    with pytest.raises(FileExistsError):
        wire.write_secret(path)  # one secret per run: never overwritten
    os.chmod(path, 0o644)
    with pytest.raises(wire.WireError, match=r"secret file .*secret is accessible .*chmod 600"):
        wire.read_secret(path)
    bad = tmp_path / "bad"
    bad.write_text("not hex at all")
    bad.chmod(0o600)
    with pytest.raises(wire.WireError, match="must be hex"):
        wire.read_secret(bad)
    bad.write_text("abcd")
    with pytest.raises(wire.WireError, match="2 bytes, at least 16"):
        wire.read_secret(bad)
    with pytest.raises(wire.WireError, match="cannot read"):
        wire.read_secret(tmp_path / "missing")


def test_keys_follow_the_secret():
    a, b = wire.curve_keys(b"a" * 32), wire.curve_keys(b"b" * 32)
    assert a == wire.curve_keys(b"a" * 32)
    assert len({a.server_public, a.client_public, b.server_public, b.client_public}) == 4
    assert zmq.curve_public(a.client_secret) == a.client_public
    assert wire.store_prefix(b"a" * 32) != wire.store_prefix(b"b" * 32)


def test_headers_are_json_never_pickle(tmp_path):
    marker = tmp_path / "unpickled"

    class Touch:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(wire.WireError, match="not JSON"):
        wire.decode_header(pickle.dumps(Touch()))
    assert not marker.exists()
    with pytest.raises(wire.WireError, match="with an 'op'"):
        wire.decode_header(b"[1, 2]")
    header, *frames = wire.encode({"op": "x", "seq": 3}, [b"raw"])
    assert wire.decode_header(header) == {"op": "x", "seq": 3} and frames == [b"raw"]


def test_records_roundtrip_exactly():
    s = Sample(3, 1, (1, 2), (7, 8, 9), "ab", (-0.1, -1e-300, -math.inf), "length", True, 4)
    back = wire.sample_from_json(
        wire.decode_header(wire.encode({"op": "s", **wire.sample_to_json(s)})[0])
    )
    assert back == s  # tuples rebuilt, floats bit-exact (-inf included)
    r = RolloutRequest([5, 6], n=2, temperature=0.7, stop=["x"], seed=9)
    assert wire.request_from_json(wire.request_to_json(r)) == r
    with pytest.raises(ValueError, match="n must be"):
        wire.request_from_json({**wire.request_to_json(r), "n": 0})


def test_bucket_specs_are_checked():
    named = [("a", torch.randn(3, 5)), ("b", torch.randn(4).to(torch.bfloat16))]
    header, frames = encode_bucket(named)
    header = wire.decode_header(wire.encode(header)[0])  # as it arrives: lists, not tuples
    got = list(decode_bucket(header, [bytes(f) for f in frames]))
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(got, named, strict=True))
    evil = {**header, "specs": [["a", "load", [3, 5]], header["specs"][1]]}
    with pytest.raises(ValueError, match="dtype 'load' is not one of"):
        list(decode_bucket(evil, frames))
    short = {**header, "specs": [["a", "float32", [3, 6]], header["specs"][1]]}
    with pytest.raises(ValueError, match="60 bytes for 72 expected"):
        list(decode_bucket(short, frames))
    with pytest.raises(ValueError, match="lists 2 tensors, 1 frames"):
        list(decode_bucket(header, frames[:1]))
    pheader, flat = pack_bucket(named)
    far = {**pheader, "specs": [["a", "float32", [3, 5], 4096]]}
    with pytest.raises(ValueError, match="outside the flat bucket"):
        list(unpack_bucket(far, flat))


def test_resolve_host():
    assert wire.resolve_host("localhost") in ("127.0.0.1", "::1")
    assert wire.resolve_host("127.0.0.1") == "127.0.0.1"
    with pytest.raises(wire.WireError, match="wildcard"):
        wire.resolve_host("0.0.0.0")
    with pytest.raises(wire.WireError, match="does not resolve"):
        wire.resolve_host("no-such-host.invalid")


def _listening(port: int) -> list[str]:
    """Local addresses listening on `port` (from /proc/net/tcp and tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, _, state = line.split()[1:4]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:
                    out.append(addr)
    return out


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp")
def test_sockets_listen_on_the_configured_interface_only():
    """The replica channel and the collective channel's TCPStore listen on 127.0.0.1 (hex
    0100007F), not on every interface (00000000), which TCPStore does by itself."""
    keys = wire.curve_keys(wire.new_secret())
    ctx = zmq.Context()
    sock, port, auth = wire.bind_server(ctx, "127.0.0.1", 0, keys)
    try:
        assert _listening(port) == ["0100007F"]
        store = CollectiveChannel.host_store("127.0.0.1", 0, 2, 10.0)
        assert _listening(store.port) == ["0100007F"]
        del store
    finally:
        auth.stop()
        sock.close(0)
        ctx.term()


def test_peers_without_the_secret_are_refused_and_get_nothing(caplog):
    """Plain TCP sending a pickle, ZMQ without CURVE, and ZMQ CURVE with the right server key
    but a client key of its own: all refused and logged; the server sees only the real
    client's messages, and what it sends reaches only that client."""
    caplog.set_level(logging.WARNING, logger="megatron_agpo.rollout")
    keys = wire.curve_keys(wire.new_secret())
    ctx = zmq.Context()
    server, port, auth = wire.bind_server(ctx, "127.0.0.1", 0, keys)
    endpoint = f"tcp://127.0.0.1:{port}"
    good = wire.connect_client(ctx, endpoint, keys)
    plain = ctx.socket(zmq.DEALER)
    impostor = ctx.socket(zmq.DEALER)
    pub, sec = zmq.curve_keypair()
    impostor.curve_serverkey, impostor.curve_publickey, impostor.curve_secretkey = (
        keys.server_public,
        pub,
        sec,
    )
    for s in (plain, impostor):
        s.linger = 0
        s.connect(endpoint)
        s.send_multipart([b"intruder", pickle.dumps({"op": "hello"})])
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(pickle.dumps({"op": "hello"}) * 20)  # past the 64-byte ZMTP greeting
    good.send_multipart(wire.encode({"op": "hello", "replica": 0}))
    try:
        received = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if server.poll(100):
                received.append(server.recv_multipart())
        assert [wire.decode_header(m[1]) for m in received] == [{"op": "hello", "replica": 0}]
        peer = received[0][0]
        server.send_multipart([peer, b"weights"])
        assert good.poll(2000) and good.recv() == b"weights"
        assert plain.poll(300) == 0 and impostor.poll(300) == 0
        raw.settimeout(0.5)
        got = b""
        try:
            while chunk := raw.recv(4096):
                got += chunk
        except (TimeoutError, ConnectionError):
            pass
        assert len(got) <= 64  # the public ZMTP greeting at most
        refused = list(auth.refused)
        assert any("not this run's secret" in r and "127.0.0.1" in r for r in refused)
        assert sum("not a ZMQ CURVE peer" in r for r in refused) >= 2, refused
        assert any("refused" in r.message for r in caplog.records)
    finally:
        raw.close()
        auth.stop()
        for s in (server, good, plain, impostor):
            s.close(0)
        ctx.term()


@pytest.mark.dist
def test_replica_refuses_a_trainer_without_the_secret(tmp_path):
    """A replica pointed at a server of another secret (say, an endpoint file rewritten by
    someone else) fails the CURVE handshake and exits, telling why; it never sends its hello
    (nor would it take prompts or weights) to that server."""
    theirs = wire.curve_keys(wire.new_secret())
    ctx = zmq.Context()
    server, port, auth = wire.bind_server(ctx, "127.0.0.1", 0, theirs)
    secret = tmp_path / "secret"
    wire.write_secret(secret)
    cmd = [sys.executable, "-m", "megatron_agpo.rollout.replica_worker"]
    cmd += ["--connect", f"tcp://127.0.0.1:{port}", "--secret-file", str(secret)]
    cmd += ["--replica-index", "0", "--wait-s", "60"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert server.poll(100) == 0
    finally:
        auth.stop()
        server.close(0)
        ctx.term()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "handshake" in proc.stderr and "another run" in proc.stderr


HEARTBEAT_CHILD = """
import os, sys, zmq
from megatron_agpo.rollout import RolloutConfig, wire
from megatron_agpo.rollout.replica_worker import Heartbeat
keys = wire.curve_keys(bytes.fromhex(os.environ.pop(wire.SECRET_ENV)))
cfg = RolloutConfig(model_path="x", heartbeat_s=0.2, heartbeat_timeout_s=1.0)
Heartbeat(zmq.Context(), sys.argv[1], keys, 3, cfg, 0).start()
while True:  # the main thread busy in Python (a replica's generate), holding the GIL often
    sum(range(10**6))
"""


@pytest.mark.dist
def test_heartbeats_from_a_busy_replica_and_exit_when_the_trainer_is_gone():
    """The worker's heartbeat thread (no vLLM here) sends every heartbeat_s while the main
    thread is busy, and ends the process (code 3) once the trainer's socket has been gone
    for heartbeat_timeout_s."""
    secret = wire.new_secret()
    keys = wire.curve_keys(secret)
    ctx = zmq.Context()
    server, port, auth = wire.bind_server(ctx, "127.0.0.1", 0, keys)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{wire.SECRET_ENV: secret.hex()})
    cmd = [sys.executable, "-c", HEARTBEAT_CHILD, f"tcp://127.0.0.1:{port}"]
    child = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        times = []
        deadline = time.monotonic() + 60
        while len(times) < 8 and time.monotonic() < deadline:
            if server.poll(100):
                _, frame = server.recv_multipart()
                assert wire.decode_header(frame) == {"op": "heartbeat", "replica": 3}
                times.append(time.monotonic())
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        print(f"\nheartbeat gaps {min(gaps):.2f}-{max(gaps):.2f} s (interval 0.2 s)")
        assert len(times) == 8 and max(gaps) < 0.6
    finally:
        auth.stop()
        server.close(0)  # the trainer is gone
        ctx.term()
    t0 = time.monotonic()
    try:
        rc = child.wait(timeout=30)
    finally:
        child.kill()
    elapsed = time.monotonic() - t0
    print(f"replica exited {elapsed:.1f} s after the trainer's socket closed (timeout 1 s)")
    assert rc == 3 and "unreachable" in child.stderr.read()
    assert 1.0 <= elapsed < 3.0
