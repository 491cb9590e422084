"""Weight-sync time into running vLLM engines vs a plain memory copy of the same bytes.

For SmolLM2-135M (fp32, 538 MB) and a larger random Llama, measured in one run:
  - memcpy: `dst.copy_(src)` of every tensor into preallocated tensors (the floor);
  - colocated: `ColocatedEngine.update_weights` (in-process vLLM `reload_weights`);
  - replica: `ReplicaPool.update_weights` to one replica process over ZMQ in buckets;
  - collective: the same to one replica with `sync_channel="collective"` (headers over ZMQ,
    each bucket's bytes as one flat tensor over the private gloo group; NCCL on GPU).
Each is the best of --repeats runs; GB/s = model bytes / seconds. The replica channel is
authenticated and encrypted (ZMQ CURVE); the first line printed is the transport alone,
plaintext vs CURVE, 1 GB over loopback in one process (--channel-only: just that).

    python benchmarks/weight_sync.py [--repeats 3 --bucket-mb 256 --channel-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# The tiny-model builder lives with the tests (tests/tiny_models.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_channel(mb: int, bucket_mb: float, repeats: int) -> dict:
    """Seconds to move `mb` MB in `bucket_mb` messages over loopback TCP between two ZMQ
    sockets of this process (the replica channel's transport without vLLM): plaintext (what
    the channel was before it was authenticated) vs CURVE with the run-secret keys."""
    import threading

    import zmq

    from megatron_agpo.rollout import wire

    keys = wire.curve_keys(wire.new_secret())
    n = max(1, int(mb / bucket_mb))
    payload = bytearray(int(bucket_mb * 1e6))
    out = {}
    for mode in ("plain", "curve"):
        ctx = zmq.Context()
        if mode == "curve":
            server, port, auth = wire.bind_server(ctx, "127.0.0.1", 0, keys)
            client = wire.connect_client(ctx, f"tcp://127.0.0.1:{port}", keys)
        else:
            auth = None
            server = ctx.socket(zmq.ROUTER)
            port = server.bind_to_random_port("tcp://127.0.0.1")
            client = ctx.socket(zmq.DEALER)
            client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hi")
        peer, _ = server.recv_multipart()

        def drain(client=client):
            for _ in range(n):
                client.recv(copy=False)

        def one_pass(server=server, peer=peer, drain=drain):
            t = threading.Thread(target=drain)
            t.start()
            for _ in range(n):
                server.send_multipart([peer, payload], copy=False)
            t.join()

        out[mode] = _best(one_pass, repeats)
        if auth is not None:
            auth.stop()
        server.close(0)
        client.close(0)
        ctx.term()
    return {"mb": n * bucket_mb, **out}


def bench_model(name: str, path: Path, repeats: int, bucket_mb: float) -> dict:
    from safetensors.torch import load_file

    from megatron_agpo.rollout import RolloutConfig
    from megatron_agpo.rollout.colocated import ColocatedEngine
    from megatron_agpo.rollout.replicas import ReplicaPool

    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    nbytes = sum(t.numel() * t.element_size() for t in state.values())

    dst = {k: torch.empty_like(v) for k, v in state.items()}
    memcpy_s = _best(lambda: [dst[k].copy_(v) for k, v in state.items()], repeats)

    cfg = RolloutConfig(
        model_path=str(path),
        dtype="float32",
        max_model_len=512,
        bucket_mb=bucket_mb,
        cpu_kvcache_space_gib=1,
    )
    engine = ColocatedEngine(cfg)
    version = iter(range(1, 1000))
    coloc_s = _best(lambda: engine.update_weights(iter(state.items()), next(version)), repeats)
    engine.close()

    with ReplicaPool(RolloutConfig(**{**cfg.to_dict(), "num_replicas": 1})) as pool:
        reports = []
        versions = iter(range(1, 1000))
        replica_s = _best(
            lambda: reports.append(pool.update_weights(iter(state.items()), next(versions))),
            repeats,
        )
        buckets = reports[-1].num_buckets
        reload_s = min(r.replica_seconds[0] for r in reports)

    coll_cfg = RolloutConfig(**{**cfg.to_dict(), "num_replicas": 1, "sync_channel": "collective"})
    with ReplicaPool(coll_cfg) as pool:
        versions = iter(range(1, 1000))
        coll_s = _best(lambda: pool.update_weights(iter(state.items()), next(versions)), repeats)
    return dict(
        name=name,
        mb=nbytes / 1e6,
        memcpy=memcpy_s,
        coloc=coloc_s,
        replica=replica_s,
        reload=reload_s,
        collective=coll_s,
        buckets=buckets,
        gb=nbytes / 1e9,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--channel-only",
        action="store_true",
        help="only the transport: plaintext vs CURVE ZMQ over loopback, no vLLM",
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(args.threads)

    ch = bench_channel(1024, min(args.bucket_mb, 256.0), args.repeats)
    print(
        f"ZMQ loopback, {ch['mb']:.0f} MB in {min(args.bucket_mb, 256.0):g} MB messages, best "
        f"of {args.repeats}: plaintext {ch['plain']:.3f} s ({ch['mb'] / 1e3 / ch['plain']:.2f} "
        f"GB/s), CURVE {ch['curve']:.3f} s ({ch['mb'] / 1e3 / ch['curve']:.2f} GB/s), "
        f"CURVE/plaintext time {ch['curve'] / ch['plain']:.2f}x"
    )
    if args.channel_only:
        return

    from megatron_agpo.models.smollm2 import smollm2_hf_dir
    from tests.tiny_models import tiny_hf_model

    big_dir = Path(tempfile.gettempdir()) / "agpo_bench_random_llama_1024x12_v2"
    if not any(big_dir.glob("*.safetensors")):
        tiny_hf_model(
            big_dir,
            hidden_size=1024,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=8,
            intermediate_size=4096,
            vocab_size=8192,
            max_position_embeddings=1024,
        )
    rows = [
        bench_model(
            "SmolLM2-135M (30 layers, hidden 576)",
            smollm2_hf_dir(),
            args.repeats,
            args.bucket_mb,
        ),
        bench_model(
            "random Llama (12 layers, hidden 1024, ffn 4096)", big_dir, args.repeats, args.bucket_mb
        ),
    ]
    print(f"fp32, best of {args.repeats}, bucket {args.bucket_mb:g} MB, {os.cpu_count()} cores")
    print(
        "| model | MB | memcpy s (GB/s) | colocated s (GB/s) | replica ZMQ s (GB/s) "
        "| replica collective s (GB/s) | replica reload s (ZMQ) | buckets |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['mb']:.0f} | {r['memcpy']:.3f} ({r['gb'] / r['memcpy']:.2f}) "
            f"| {r['coloc']:.3f} ({r['gb'] / r['coloc']:.2f}) "
            f"| {r['replica']:.3f} ({r['gb'] / r['replica']:.2f}) "
            f"| {r['collective']:.3f} ({r['gb'] / r['collective']:.2f}) | {r['reload']:.3f} "
            f"| {r['buckets']} |"
        )


if __name__ == "__main__":
    main()
