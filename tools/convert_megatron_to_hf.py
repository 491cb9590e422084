"""megatron-core distributed checkpoint -> HF folder (safetensors, config.json, tokenizer)
that transformers and vLLM load.

    python tools/convert_megatron_to_hf.py --ckpt DIR --out DIR
"""

from __future__ import annotations

import argparse
import time

from megatron_agpo.models.checkpoint import convert_megatron_to_hf


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint folder written by this project")
    ap.add_argument("--out", required=True, help="output HF folder")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: on for large models)")  # fmt: skip
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = convert_megatron_to_hf(args.ckpt, args.out, progress=args.progress)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
