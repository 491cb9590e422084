"""agpo-annotate: label an unlabelled pool of query-item pairs with an annotator model.

    agpo-annotate --model runs/relevance/hf --input pool.jsonl --out runs/annot \\
        [--gold test.jsonl] [--run-config runs/relevance/config.json] [--k 8] [--seed 0]

Each pair is rendered with the annotator's prompt template and the model's chat template,
sampled k times with vLLM (one seed per pair, so a pair's samples do not depend on its
batch), and labelled by majority vote over the k answers (each read by the relevance
reward's rule: exactly one \\boxed{<code or name>}); the vote share is the confidence.
Malformed answers vote for nothing but count in the share's denominator; ties go to the
more relevant label; a pair with no valid answer gets label null and confidence 0.

Writes, in --out:
- samples.jsonl: the k completions of every pair, appended as batches finish. Resumable: run
  the same command again after a crash and finished pairs are read back, not resampled
  (the same append-only log as the pass@k evaluator, `megatron_agpo.eval.driver`);
- annotations.jsonl: the pool's pairs with `label` (majority, a label name), `confidence`,
  `votes` ({code: count}) and `k`;
- with --gold (labelled pairs): gold_samples.jsonl, gold_annotations.jsonl and
  gold_metrics.json: majority@k (accuracy of the majority label), pass@j for j = 1, 2, 4..k
  (some sample right; unbiased estimator), accuracy / macro-F1 / per-class F1 of the majority
  labels, and the share of malformed answers.

The prompt template and label set are the defaults of `RelevanceDataConfig` unless
--run-config names a training run's config.json (its data.relevance is used, so the
annotator sees the prompts it was trained on) or the flags below override them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from megatron_agpo.data.relevance import (
    LabelSet,
    RelevanceDataConfig,
    RelevancePromptConfig,
    RelevanceRecord,
    load_records,
    render_prompt,
)
from megatron_agpo.eval.benchmarks import EvalProblem
from megatron_agpo.eval.driver import GenerateFn, evaluate
from megatron_agpo.eval.passk import pass_at_k_curve
from megatron_agpo.registry import require_valid
from megatron_agpo.relevance.metrics import classification_metrics, majority_vote
from megatron_agpo.rewards.relevance import parse_label


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agpo-annotate",
        description="Label query-item pairs with an annotator model (vLLM): k samples per "
        "pair, majority vote, vote share as confidence; resumable. With --gold, also report "
        "the annotator's majority@k, pass@k and macro-F1 on labelled pairs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="annotator: an HF model folder vLLM loads")
    p.add_argument(
        "--input",
        help="pairs to label: .jsonl / .json / .parquet rows {query, title, id?, query_id?, "
        "brand?, category?, type?, price?} (a label field, if any, is ignored)",
    )
    p.add_argument("--gold", help="labelled pairs (same fields plus label) to score the annotator")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--k", type=int, default=8, help="samples per pair (majority vote over k)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each pair's derives from it")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64, help="pairs per vLLM call")
    p.add_argument("--dtype", default="auto", help="vLLM dtype (float32 for the tiny model)")
    p.add_argument("--max-model-len", type=int, default=0, help="vLLM context (0: the model's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument(
        "--run-config",
        help="a training run's config.json: take its data.relevance labels and prompt template",
    )
    p.add_argument("--labels", nargs="+", help="label names, most relevant first (default ESCI)")
    p.add_argument("--codes", nargs="+", help="label codes the annotator answers with")
    p.add_argument("--template", help="prompt template (see RelevancePromptConfig.template)")
    p.add_argument("--instruction", help="text for the template's {instruction}")
    p.add_argument("--item-fields", nargs="*", help="attributes appended to the item's title")
    return p


@dataclass(frozen=True)
class Setup:
    """What the annotator is asked and how its answers are read."""

    labels: LabelSet
    prompt: RelevancePromptConfig


def setup_from_args(args: argparse.Namespace) -> Setup:
    data = RelevanceDataConfig()
    labels, codes = list(data.labels), list(data.codes)
    prompt: dict[str, Any] = {}
    if args.run_config:
        path = Path(args.run_config)
        try:
            rel = json.loads(path.read_text())["data"]["relevance"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--run-config {path}: no data.relevance in it ({e!r})") from None
        labels, codes = rel["labels"], rel["codes"]
        known = {f.name for f in fields(RelevancePromptConfig)}
        prompt = {k: v for k, v in rel.get("prompt", {}).items() if k in known}
    if args.labels:
        labels, codes = args.labels, args.codes or []
    elif args.codes:
        codes = args.codes
    for key, value in (
        ("template", args.template),
        ("instruction", args.instruction),
        ("item_fields", args.item_fields),
    ):
        if value is not None:
            prompt[key] = value
    try:
        setup = Setup(LabelSet.of(labels, codes), RelevancePromptConfig(**prompt))
        require_valid(setup.prompt, "prompt.")
        return setup
    except ValueError as e:
        raise SystemExit(f"agpo-annotate: {e}") from None


def make_vllm_generate(args: argparse.Namespace, ids_of: Callable[[str], list[int]]) -> GenerateFn:
    """A GenerateFn on one in-process vLLM engine, fed token ids (the chat template was
    applied here, exactly as the trainer's `encode_prompts` does)."""
    from vllm import SamplingParams, TokensPrompt

    from megatron_agpo.rollout.config import RolloutConfig
    from megatron_agpo.rollout.vllm_engine import build_llm

    cfg = RolloutConfig(
        model_path=args.model,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=args.seed,
    )
    if args.max_model_len:
        cfg.max_model_len = args.max_model_len
    else:
        cfg.max_model_len = _model_max_len(args.model, cfg.max_model_len)
    llm = build_llm(cfg)

    def generate(prompts: list[str], n: int, seeds: list[int]) -> list[list[str]]:
        params = [
            SamplingParams(
                n=n,
                seed=s,
                temperature=args.temperature,
                top_p=args.top_p,
                max_tokens=args.max_new_tokens,
            )
            for s in seeds
        ]
        reqs = [TokensPrompt(prompt_token_ids=ids_of(p)) for p in prompts]
        outs = llm.generate(reqs, params, use_tqdm=False)
        return [[o.text for o in out.outputs] for out in outs]

    generate.llm = llm  # type: ignore[attr-defined]  # kept alive for the caller to release
    return generate


def _model_max_len(model: str, default: int) -> int:
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return default
    return int(cfg.get("max_position_embeddings", default))


def _render(recs: Sequence[RelevanceRecord], setup: Setup, tokenizer) -> tuple[list[str], dict]:
    """Chat-templated prompt text per pair, and text -> token ids."""
    texts, ids = [], {}
    for r in recs:
        msgs = list(render_prompt(r, setup.prompt, setup.labels))
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            tok = tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            text = msgs[-1]["content"]
            tok = tokenizer(text, add_special_tokens=True)["input_ids"]
        texts.append(text)
        ids[text] = list(tok)
    return texts, ids


def votes_of(completions: Sequence[str], labels: LabelSet) -> tuple[list[int | None], int]:
    """Each completion's label index (None: malformed), and the count of malformed ones."""
    v = [parse_label(c, labels)[0] for c in completions]
    return v, sum(x is None for x in v)


def _sample(
    name: str,
    recs: Sequence[RelevanceRecord],
    setup: Setup,
    generate_fn: GenerateFn,
    tokenizer_texts: tuple[list[str], dict],
    args: argparse.Namespace,
    path: Path,
) -> list[tuple[RelevanceRecord, tuple[str, ...]]]:
    texts, _ = tokenizer_texts
    labels = setup.labels

    def score(completion: str, answer: str) -> float:
        if not answer:
            return 0.0  # unlabelled pool: no score
        pred, _ = parse_label(completion, labels)
        return float(pred is not None and pred == labels.lookup(answer))

    problems = []
    for r, text in zip(recs, texts, strict=True):
        gold = labels.lookup(r.label) if r.label else None
        answer = labels.codes[gold] if gold is not None else ""
        problems.append(EvalProblem(name, r.id, text, answer))

    def progress(done: int, total: int) -> None:
        print(f"[agpo-annotate] {name}: {done}/{total} pairs", file=sys.stderr, flush=True)

    results = evaluate(
        generate_fn,
        score,
        problems,
        args.k,
        args.seed,
        path,
        prompt_fn=lambda p: p.problem,
        batch_size=args.batch_size,
        save_completions=True,
        settings={
            "model": str(args.model),
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "labels": list(labels.names),
            "codes": list(labels.codes),
        },
        progress=progress,
    )
    return [(r, res.completions) for r, res in zip(recs, results, strict=True)]


def aggregate(
    sampled: Sequence[tuple[RelevanceRecord, Sequence[str]]], labels: LabelSet, k: int
) -> list[dict[str, Any]]:
    """One annotation row per pair: the record's fields (without its own label), then label,
    confidence, votes, malformed and k."""
    rows = []
    for rec, completions in sampled:
        votes, bad = votes_of(completions, labels)
        winner, share = majority_vote(votes, k)
        counts = Counter(labels.codes[v] for v in votes if v is not None)
        row = rec.to_row(with_label=False)
        row.update(
            label=None if winner is None else labels.names[winner],
            confidence=share,
            votes=dict(sorted(counts.items())),
            malformed=bad,
            k=k,
        )
        rows.append(row)
    return rows


def gold_metrics(
    sampled: Sequence[tuple[RelevanceRecord, Sequence[str]]], labels: LabelSet, k: int
) -> dict[str, Any]:
    """majority@k, pass@j, sample accuracy, malformed share and the majority labels'
    classification metrics against the records' gold labels."""
    gold, majority, counts, bad = [], [], [], 0
    for rec, completions in sampled:
        g = labels.lookup(rec.label or "")
        if g is None:
            raise ValueError(f"gold pair {rec.id!r} has no label")
        votes, nbad = votes_of(completions, labels)
        bad += nbad
        gold.append(g)
        majority.append(majority_vote(votes, k)[0])
        counts.append((k, sum(v == g for v in votes)))
    cls = classification_metrics(gold, majority, labels)
    passk = pass_at_k_curve(counts)
    return {
        "pairs": len(gold),
        "k": k,
        f"majority@{k}": cls["accuracy"],
        "macro_f1": cls["macro_f1"],
        "per_class_f1": {n: cls[f"f1/{n}"] for n in labels.names},
        "pass@k": {str(j): v for j, v in passk.items()},
        "sample_accuracy": passk[1],
        "malformed_share": bad / (k * len(gold)),
    }


def context_len(args: argparse.Namespace) -> int:
    """The engine's context: --max-model-len, else the model's, else the rollout default."""
    from megatron_agpo.rollout.config import RolloutConfig

    if args.max_model_len:
        return args.max_model_len
    return _model_max_len(args.model, RolloutConfig(model_path=str(args.model)).max_model_len)


def _check_lengths(args: argparse.Namespace, parts) -> None:
    """Every prompt and its answer fit the engine's context; checked before it starts."""
    room = context_len(args) - args.max_new_tokens
    for flag, recs, (texts, ids) in parts:
        for rec, text in zip(recs, texts, strict=True):
            n = len(ids[text])
            if n > room:
                raise SystemExit(
                    f"agpo-annotate: {flag} {getattr(args, flag[2:])}: pair {rec.id!r} is a "
                    f"{n}-token prompt, longer than the {room} tokens the context leaves "
                    f"(max model len {room + args.max_new_tokens} - --max-new-tokens "
                    f"{args.max_new_tokens}); raise --max-model-len or shorten the pair"
                )


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run(args: argparse.Namespace, generate_fn: GenerateFn | None = None, tokenizer=None) -> dict:
    """The CLI's work; tests inject `generate_fn` and `tokenizer`."""
    if not args.input and not args.gold:
        raise SystemExit("agpo-annotate: give --input (pairs to label) and/or --gold")
    if args.k < 1:
        raise SystemExit(f"agpo-annotate: --k {args.k} must be >= 1")
    setup = setup_from_args(args)
    if generate_fn is None:  # a local HF folder: nothing here goes to the network
        from megatron_agpo.validate import model_folder_problem

        problem = model_folder_problem("--model", str(args.model))
        if problem:
            raise SystemExit(f"agpo-annotate: {problem.replace('--model=', '--model ')}")
    try:
        pool = load_records(args.input, setup.labels, require_label=False) if args.input else []
        gold = load_records(args.gold, setup.labels, require_label=True) if args.gold else []
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"agpo-annotate: {e}") from None
    for flag, path, recs in (("--input", args.input, pool), ("--gold", args.gold, gold)):
        if path and not recs:
            raise SystemExit(f"agpo-annotate: {flag} {path} holds no pairs: nothing to label")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    rendered_pool = _render(pool, setup, tokenizer)
    rendered_gold = _render(gold, setup, tokenizer)
    ids = {**rendered_pool[1], **rendered_gold[1]}
    _check_lengths(args, (("--input", pool, rendered_pool), ("--gold", gold, rendered_gold)))
    if generate_fn is None:
        generate_fn = make_vllm_generate(args, lambda text: ids[text])
    summary: dict[str, Any] = {"model": str(args.model), "k": args.k}
    if pool:
        sampled = _sample(
            "pool", pool, setup, generate_fn, rendered_pool, args, out / "samples.jsonl"
        )
        rows = aggregate(sampled, setup.labels, args.k)
        _write_jsonl(out / "annotations.jsonl", rows)
        summary["annotated"] = len(rows)
        summary["unlabelled"] = sum(r["label"] is None for r in rows)
        summary["mean_confidence"] = sum(r["confidence"] for r in rows) / len(rows)
        summary["label_counts"] = dict(Counter(r["label"] for r in rows if r["label"]))
    if gold:
        sampled = _sample(
            "gold", gold, setup, generate_fn, rendered_gold, args, out / "gold_samples.jsonl"
        )
        _write_jsonl(out / "gold_annotations.jsonl", aggregate(sampled, setup.labels, args.k))
        metrics = gold_metrics(sampled, setup.labels, args.k)
        (out / "gold_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        summary["gold"] = metrics
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def read_annotations(
    path: str | Path, labels: LabelSet
) -> tuple[list[RelevanceRecord], list[float]]:
    """The labelled pairs of an annotations.jsonl and their confidences (pairs without a
    valid answer are left out)."""
    recs = load_records(path, labels, require_label=False)
    conf = [json.loads(line)["confidence"] for line in Path(path).read_text().splitlines() if line]
    kept = [(r, c) for r, c in zip(recs, conf, strict=True) if r.label is not None]
    return [r for r, _ in kept], [c for _, c in kept]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    from megatron_agpo.launcher import leave

    leave(main())  # without the interpreter's teardown of the torch / vLLM modules
