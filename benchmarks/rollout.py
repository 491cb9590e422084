"""Sampling throughput: vLLM (ColocatedEngine) vs transformers `generate`, same prompts,
samples per prompt and lengths, SmolLM2-135M-Instruct in fp32 (or --dtype bfloat16) on this machine.

Both sides sample exactly --max-new-tokens per sample (EOS ignored / min length), at
temperature 1, and tokens/s counts generated tokens only. vLLM also returns each token's
log-prob; transformers is run without scores (its cheapest setting).

    python benchmarks/rollout.py [--prompts 4 --n 8 --max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM compile the model (torch.compile/inductor on CPU; enforce_eager=False)",
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_agpo.models.smollm2 import smollm2_hf_dir
    from megatron_agpo.rollout import RolloutConfig, RolloutRequest
    from megatron_agpo.rollout.colocated import ColocatedEngine

    path = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    questions = [
        f"What is {7 * i + 12} + {3 * i + 25}? Answer briefly." for i in range(args.prompts)
    ]
    prompts = []
    for q in questions:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        prompts.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    T = args.max_new_tokens
    total = args.prompts * args.n * T

    # --- vLLM
    t0 = time.perf_counter()
    engine = ColocatedEngine(
        RolloutConfig(
            model_path=str(path),
            dtype=args.dtype,
            max_model_len=1024,
            enforce_eager=not args.compile,
        )
    )
    start_s = time.perf_counter() - t0
    reqs = [
        RolloutRequest(p, n=args.n, max_new_tokens=T, seed=i, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    engine.generate(reqs[:1])  # warm-up
    t0 = time.perf_counter()
    batch = engine.generate(reqs)
    vllm_s = time.perf_counter() - t0
    vllm_tokens = sum(len(s.response_token_ids) for s in batch.samples)
    engine.close()
    del engine

    # --- transformers
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, args.dtype)).eval()
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    pad_len = torch.tensor([width - len(p) for p in prompts])
    mask = torch.arange(width)[None, :] >= pad_len[:, None]
    gen_kw = dict(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_return_sequences=args.n,
        max_new_tokens=T,
        min_new_tokens=T,
        pad_token_id=pad,
    )
    with torch.no_grad():
        model.generate(
            ids[:1],
            attention_mask=mask[:1].long(),
            **{**gen_kw, "max_new_tokens": 4, "min_new_tokens": 4},
        )
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask.long(), **gen_kw)
        hf_s = time.perf_counter() - t0
    hf_tokens = (out.shape[1] - width) * out.shape[0]

    print(
        f"SmolLM2-135M-Instruct {args.dtype}, {args.prompts} prompts x n={args.n} x {T} new tokens "
        f"({total} tokens), torch threads {args.threads}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores; vLLM engine start {start_s:.1f} s"
        f"{' (compiled)' if args.compile else ' (eager)'}"
    )
    print("| engine | tokens | seconds | tokens/s |\n|---|---|---|---|")
    print(
        f"| vLLM (ColocatedEngine, with log-probs) | {vllm_tokens} | {vllm_s:.2f} "
        f"| {vllm_tokens / vllm_s:.0f} |"
    )
    print(f"| transformers generate | {hf_tokens} | {hf_s:.2f} | {hf_tokens / hf_s:.0f} |")
    print(f"| ratio vLLM / transformers | | | {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.2f}x |")


if __name__ == "__main__":
    main()
