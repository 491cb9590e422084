"""The tiny default policy: a random Llama with a character tokenizer, given a short supervised
warm start on the arithmetic task so that RL starts from a pass rate well above zero.

The warm start trains transformers' LlamaForCausalLM (plain PyTorch, one process, a minute or
two on 2 cores) and saves an HF folder; RL then loads that folder into megatron-core and vLLM
like any other checkpoint. The folder is cached under a key (`_key`) that hashes what shapes
the weights: the model and warm-start settings, the data (levels and seed; for relevance, the
warm-start pairs as prompts), the code that builds and trains it (`WEIGHT_CODE`: the syntax
trees of those modules, so comments and docstrings do not count) and the versions of torch,
transformers and megatron-core. A changed policy or library is a new cache entry.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import random
from pathlib import Path

import torch

from megatron_agpo.cache import build_once
from megatron_agpo.data.arithmetic import ArithmeticConfig, generate_arithmetic
from megatron_agpo.data.char_tokenizer import build_char_tokenizer
from megatron_agpo.trainer.config import DataSection, ModelSection


def response_text(answer: str) -> str:
    """What a correct response looks like for the tiny model."""
    return f"\\boxed{{{answer}}}"


WEIGHT_CODE = (
    "megatron_agpo.trainer.warmstart",
    "megatron_agpo.data.arithmetic",
    "megatron_agpo.data.char_tokenizer",
)
"""The modules whose code shapes the warm-started weights (model construction, training loop,
data, tokenizer). A relevance warm start adds the module of its examples (`_weight_modules`).
"""

WEIGHT_LIBRARIES = ("torch", "transformers", "megatron-core")
"""Distributions whose versions are part of the key (the warm start trains transformers'
Llama with torch; megatron-core loads the result)."""


def _weight_modules(data: DataSection) -> list[str]:
    names = list(WEIGHT_CODE)
    if data.kind == "relevance":
        from megatron_agpo.data.relevance import warmstart_examples

        names.append(warmstart_examples.__module__)
    return sorted(set(names))


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(sources: dict[str, str]) -> str:
    """Digest of source texts by name: their syntax trees without docstrings, so a comment,
    docstring or formatting change keeps the key and any change to the code changes it."""
    h = hashlib.sha256()
    for name in sorted(sources):
        tree = _strip_docstrings(ast.parse(sources[name]))
        h.update(name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:16]


def _code_digest(modules: list[str]) -> str:
    """`code_digest` of the named modules' source files, keyed by module name (not path: the
    key must not depend on where the checkout lives)."""
    return code_digest(
        {m: inspect.getsource(importlib.import_module(m)) for m in modules}
    )  # fmt: skip


def _library_versions() -> dict[str, str]:
    out = {}
    for dist in WEIGHT_LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _key(model: ModelSection, data: DataSection) -> str:
    fields = {
        k: getattr(model, k)
        for k in (
            "tiny_hidden",
            "tiny_layers",
            "tiny_heads",
            "tiny_ffn",
            "tiny_max_len",
            "warmstart_steps",
            "warmstart_lr",
            "warmstart_batch",
        )
    }
    fields.update(levels=list(data.warmstart_levels), seed=data.seed, version=3)
    fields.update(code=_code_digest(_weight_modules(data)), libraries=_library_versions())
    fields["threads"] = WARMSTART_THREADS
    if data.kind == "relevance":
        from megatron_agpo.data.relevance import warmstart_fingerprint

        fields["relevance"] = warmstart_fingerprint(data)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def tiny_policy_dir(model: ModelSection, data: DataSection, log=print) -> Path:
    """The warm-started tiny model's HF folder, built on first use and cached."""
    root = Path(os.path.expanduser(model.cache_dir))
    task = "relevance" if data.kind == "relevance" else "arith"
    out = root / f"tiny-{task}-{_key(model, data)}"
    # One builder per entry: runs started together on an empty cache wait for the first.
    return build_once(
        out,
        lambda folder: (folder / "config.json").exists(),
        lambda tmp: build_and_warm_start(model, data, tmp, log=log),
    )


WARMSTART_THREADS = 2
"""The warm start always uses this many threads: CPU float reductions depend on the thread
count, and the stored curve of the default run (tests/test_default_curve.py) must not depend
on how the launching shell set OMP_NUM_THREADS."""


def build_and_warm_start(model: ModelSection, data: DataSection, out: Path, log=print) -> float:
    """Build the tiny Llama, train it supervised, save it to `out`. Returns the final
    greedy accuracy on held-out warm-start problems."""
    threads = torch.get_num_threads()
    torch.set_num_threads(WARMSTART_THREADS)
    try:
        return _build_and_warm_start(model, data, out, log)
    finally:
        torch.set_num_threads(threads)


def _build_and_warm_start(model: ModelSection, data: DataSection, out: Path, log=print) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer(out, model_max_length=model.tiny_max_len)
    torch.manual_seed(data.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=model.tiny_hidden,
        intermediate_size=model.tiny_ffn,
        num_hidden_layers=model.tiny_layers,
        num_attention_heads=model.tiny_heads,
        num_key_value_heads=max(1, model.tiny_heads // 2),
        max_position_embeddings=model.tiny_max_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    lm = LlamaForCausalLM(config)
    if data.kind == "relevance":  # a small labelled split of query-item pairs
        from megatron_agpo.data.relevance import warmstart_examples

        train, held = warmstart_examples(data)
    else:
        train = generate_arithmetic(
            ArithmeticConfig(
                levels=tuple(data.warmstart_levels), seed=data.seed + 1, num_train=4000, num_eval=64
            ),
            "train",
        )
        held = generate_arithmetic(
            ArithmeticConfig(
                levels=tuple(data.warmstart_levels), seed=data.seed + 1, num_eval=64, num_train=1
            ),
            "eval",
        )

    def encode(ex) -> tuple[list[int], int]:
        prompt = [tok.bos_token_id] + tok.encode(ex.problem, add_special_tokens=False)
        resp = tok.encode(response_text(ex.ground_truth), add_special_tokens=False)
        return prompt + resp + [tok.eos_token_id], len(prompt)

    pairs = [encode(ex) for ex in train]
    opt = torch.optim.AdamW(lm.parameters(), lr=model.warmstart_lr, weight_decay=0.01)
    rng = random.Random(data.seed)
    steps = model.warmstart_steps
    lm.train()
    for step in range(steps):
        lr = model.warmstart_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = rng.sample(pairs, model.warmstart_batch)
        width = max(len(s) for s, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, (seq, plen) in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, plen : len(seq)] = torch.tensor(seq[plen:])  # loss on the response only
        loss = lm(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"warm start: step {step + 1}/{steps} loss {loss.item():.3f}")
    acc = greedy_accuracy(lm, tok, held)
    log(f"warm start: greedy accuracy on {len(held)} held-out problems {acc:.2f}")
    lm.eval()
    lm.save_pretrained(out, safe_serialization=True)
    return acc


@torch.no_grad()
def greedy_accuracy(lm, tok, examples) -> float:
    lm.eval()
    correct = 0
    for ex in examples:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(ex.problem, add_special_tokens=False)])
        out = lm.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += text.strip() == response_text(ex.ground_truth)
    lm.train()
    return correct / max(len(examples), 1)
