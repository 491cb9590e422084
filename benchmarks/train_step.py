"""One training step (forward + backward) tokens/s: megatron GPTModel at TP=1 vs transformers'
model on the same SmolLM2-135M weights and batch, side by side in one process; on CUDA also
the model FLOPs utilisation (MFU) of a randomly initialised ~1B Llama.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_step.py [--batch 4 --seq 256 --iters 3]
    python benchmarks/train_step.py --model llama1b --json out.json   # GPU: MFU, bf16

--model smollm2 (default): the real SmolLM2-135M-Instruct, megatron vs transformers.
--model llama1b: TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads / 4 KV heads, ffn
5632, vocab 32000), random weights, megatron only (no checkpoint to read: it is built in
place). The device is CUDA when there is one (--device cpu to force), the dtype float32 on
the CPU and bfloat16 on CUDA unless --dtype says otherwise.

Model FLOPs per token are 6 N + 12 L H S (N: parameters of every matmul, the output layer
included and the embedding lookup excluded; L layers, H width, S sequence length: the
attention scores and values, PaLM's convention, no causal halving); MFU divides the achieved
rate by the GPU's dense peak for the dtype (--peak-tflops, else a table of known GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from megatron_agpo.parallel import free_port

# Dense (no sparsity) peak TFLOP/s per GPU for bf16 / fp16 tensor cores, from the vendor's
# data sheets (SXM parts). fp32 runs are compared with the TF32 peak only if TF32 is on,
# which it is not here, so fp32 gets no MFU.
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}

LLAMA_1B = dict(
    architecture="LlamaForCausalLM", hidden_size=2048, ffn_hidden_size=5632, num_layers=22,
    num_attention_heads=32, num_query_groups=4, head_dim=64, vocab_size=32000,
    max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    """The GPU's dense bf16/fp16 peak (TFLOP/s), or None where it is unknown or not the
    dtype's peak (CPU, fp32)."""
    if override:
        return override
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


def flops_per_token(cfg, seq: int) -> float:
    """6 N + 12 L H S, N = parameters of every matmul (output layer in, embedding out)."""
    h, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    qkv = h * cfg.head_dim * (cfg.num_attention_heads + 2 * cfg.num_query_groups)
    proj = cfg.head_dim * cfg.num_attention_heads * h
    mlp = 3 * h * f  # SwiGLU: gate, up, down
    n = layers * (qkv + proj + mlp) + cfg.vocab_size * h
    return 6.0 * n + 12.0 * layers * h * seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "llama1b"], default="smollm2")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak")
    ap.add_argument("--json", default="", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (and no MFU claim)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1"
    )
    from megatron.core import tensor_parallel

    from megatron_agpo.models import (
        ModelConfig,
        build_model,
        build_model_from_hf,
        mask_vocab_padding_,
    )
    from megatron_agpo.parallel import ParallelConfig, destroy_parallel, init_parallel

    init_parallel(ParallelConfig())
    hf_dir = None
    if args.model == "smollm2":
        from megatron_agpo.models.smollm2 import smollm2_hf_dir

        hf_dir = smollm2_hf_dir()
        mg, cfg = build_model_from_hf(hf_dir, params_dtype=args.dtype)
        name = "SmolLM2-135M"
    else:
        cfg = ModelConfig(**LLAMA_1B, params_dtype=args.dtype)
        mg = build_model(cfg)
        name = "Llama ~1.1B (TinyLlama shape, random weights)"
        args.no_hf = True
    mg.to(device)
    n_params = sum(p.numel() for p in mg.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    inp, lab = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(args.seq, device=device).expand_as(inp)

    def mg_step():
        mg.zero_grad(set_to_none=True)
        logits = mask_vocab_padding_(mg(inp, pos, None), cfg)
        tensor_parallel.vocab_parallel_cross_entropy(logits.float(), lab).mean().backward()

    tokens = args.batch * args.seq
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_mg = _time(mg_step, args.iters, device)
    peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    t_hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device)

        def hf_step():
            hf.zero_grad(set_to_none=True)
            logits = hf(inp).logits
            F.cross_entropy(logits.flatten(0, 1).float(), lab.flatten()).backward()

        t_hf = _time(hf_step, args.iters, device)
    flops = flops_per_token(cfg, args.seq) * tokens
    achieved = flops / t_mg / 1e12
    peak = peak_tflops(device, dtype, args.peak_tflops)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    where = gpu or f"CPU, torch threads {torch.get_num_threads()}"
    print(
        f"{name} {args.dtype}, {where}, batch {args.batch} x seq {args.seq}, "
        f"forward+backward, mean of {args.iters} after 1 warm-up"
    )
    print(
        f"megatron TP=1  {t_mg:6.3f} s/step  {tokens / t_mg:9.1f} tokens/s  {achieved:.1f} TFLOP/s"
    )
    if peak:
        print(f"MFU {achieved / peak:.3f} (peak {peak:g} TFLOP/s dense {args.dtype})")
    if peak_mem is not None:
        print(f"peak GPU memory {peak_mem:.2f} GB")
    if t_hf is not None:
        print(f"transformers   {t_hf:6.3f} s/step  {tokens / t_hf:9.1f} tokens/s")
    if args.json:
        record = dict(
            benchmark="train_step", model=name, params=n_params, device=device.type, gpu=gpu,
            dtype=args.dtype, batch=args.batch, seq=args.seq, iters=args.iters,
            megatron_s_per_step=t_mg, megatron_tokens_per_s=tokens / t_mg,
            model_tflops_per_step=flops / 1e12, achieved_tflops=achieved, peak_tflops=peak,
            mfu=achieved / peak if peak else None, peak_mem_gb=peak_mem,
            transformers_s_per_step=t_hf,
            transformers_tokens_per_s=tokens / t_hf if t_hf else None,
        )  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
