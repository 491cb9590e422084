"""megatron_agpo checkpoint -> HF folder (safetensors, config.json, tokenizer) that
transformers, vLLM and tools/eval_passk.py load.

    python tools/convert_megatron_to_hf.py --ckpt runs/default --out hf_out
    python tools/convert_megatron_to_hf.py --ckpt runs/default/checkpoints/step_0000060 --out hf_out

--ckpt is a checkpoint folder (a training run's step_NNNNNNN, or the output of
convert_hf_to_megatron.py), or a run folder: its latest complete checkpoint. Every file of
the model is checked against the checkpoint's manifest (SHA-256) before it is read.

A Megatron-LM training checkpoint (torch_dist: latest_checkpointed_iteration.txt and
iter_NNNNNNN/) is read too: its model part, the config from its saved arguments (or
--hf-config), the tokenizer from --tokenizer:

    python tools/convert_megatron_to_hf.py --ckpt /ckpts/llama --tokenizer /models/llama --out hf
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_agpo.models.checkpoint import CheckpointError, convert_megatron_to_hf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint folder, or a run folder (runs/X)")
    ap.add_argument("--out", required=True, help="output HF folder")
    ap.add_argument(
        "--hf-config",
        help="Megatron-LM checkpoints: config.json of the model "
        "(default: from the checkpoint's saved arguments)",
    )
    ap.add_argument("--tokenizer", help="Megatron-LM checkpoints: folder with the tokenizer files")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: on for large models)")  # fmt: skip
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        ckpt = convert_megatron_to_hf(
            args.ckpt, args.out, args.progress, hf_config=args.hf_config, tokenizer=args.tokenizer
        )
    except (CheckpointError, FileExistsError) as e:
        print(f"convert_megatron_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} from {ckpt} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    from megatron_agpo.launcher import leave

    leave(main())  # without the interpreter's teardown of the torch / vLLM modules
