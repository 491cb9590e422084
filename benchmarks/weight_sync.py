"""Weight-sync time into running vLLM engines vs a plain memory copy of the same bytes.

For SmolLM2-135M (fp32, 538 MB) and a larger random Llama, measured in one run:
  - memcpy: `dst.copy_(src)` of every tensor into preallocated tensors (the floor);
  - colocated: `ColocatedEngine.update_weights` (in-process vLLM `reload_weights`);
  - replica: `ReplicaPool.update_weights` to one replica process over ZMQ in buckets;
  - collective: the same to one replica with `sync_channel="collective"` (headers over ZMQ,
    each bucket's bytes as one flat tensor over the private gloo group; NCCL on GPU).
Each is the best of --repeats runs; GB/s = model bytes / seconds.

    python benchmarks/weight_sync.py [--repeats 3 --bucket-mb 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(args.threads)

    from megatron_agpo.rollout.testing_utils import make_tiny_llama, smollm2_hf_folder

    big_dir = Path(tempfile.gettempdir()) / "agpo_bench_random_llama_1024x12"
    if not any(big_dir.glob("*.safetensors")):
        make_tiny_llama(
            big_dir,
            hidden_size=1024,
            num_layers=12,
            num_heads=16,
            num_kv_heads=8,
            intermediate_size=4096,
            max_position_embeddings=1024,
        )
    rows = [
        bench_model(
            "SmolLM2-135M (30 layers, hidden 576)",
            smollm2_hf_folder(),
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
