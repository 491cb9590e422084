"""HF checkpoint folder -> megatron_agpo checkpoint (megatron-core dist checkpoint of the model,
tokenizer, manifest): the format that training runs and the export tool use
(docs/CHECKPOINTS.md).

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR --tp N --pp M [--ep E]

On CPU it spawns M*lcm(N, E) gloo processes that each write their shard; the checkpoint loads
at any other TP/PP/EP. --ep (mixture-of-experts models): the experts split over E ranks, each
writing its own. Supported architectures: see megatron_agpo.models.SUPPORTED_ARCHITECTURES.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_agpo.models.checkpoint import CheckpointError, convert_hf_to_megatron


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF folder (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="output checkpoint folder (new or empty)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write at")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write at")
    ap.add_argument(
        "--ep", type=int, default=1, help="expert-parallel size to write at (mixture of experts)"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = convert_hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"convert_hf_to_megatron: error: {e}", file=sys.stderr)
        return 2
    ep = f" EP={args.ep}" if args.ep != 1 else ""
    print(f"wrote {args.out} ({cfg.architecture}, {cfg.num_layers} layers, TP={args.tp} "
          f"PP={args.pp}{ep}) in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    from megatron_agpo.launcher import leave

    leave(main())  # without the interpreter's teardown of the torch / vLLM modules
