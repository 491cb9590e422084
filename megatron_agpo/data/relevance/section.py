"""The `data.relevance` section and what it gives the trainer: its (train, held-out) pairs and
prompts from the chosen source (synthetic, file or esci), and the tiny policy's warm-start
prompts with their fingerprint (part of the warm start's cache key)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from megatron_agpo.data.records import PromptExample
from megatron_agpo.data.relevance.esci import load_esci
from megatron_agpo.data.relevance.prompts import RelevancePromptConfig, to_prompt_example
from megatron_agpo.data.relevance.schema import (
    ESCI_CODES,
    ESCI_NAMES,
    LabelSet,
    RelevanceRecord,
    load_records,
)
from megatron_agpo.data.relevance.synthetic import SyntheticConfig, generate_synthetic


@dataclass
class RelevanceDataConfig:
    """`data.relevance`: where the pairs come from, the label set and the prompt template.
    Used when data.kind=relevance (with reward=relevance)."""

    source: str = "synthetic"
    """synthetic (the seeded catalogue, seed data.seed), file (JSONL/parquet rows) or esci
    (the Shopping Queries release's parquet files)."""
    path: str = ""
    """file: the training pairs; esci: shopping_queries_dataset_examples.parquet."""
    eval_path: str = ""
    """file: held-out pairs (empty: the first num_eval rows of path are held out)."""
    warmstart_path: str = ""
    """file / esci: labelled pairs for the tiny model's supervised warm start."""
    products_path: str = ""
    """esci: shopping_queries_dataset_products.parquet."""
    esci_locale: str = "us"
    """esci: product_locale kept (us, es, jp; empty: all)."""
    esci_version: str = "small"
    """esci: small (the task-1 subset), large or all."""
    num_train: int = 0
    """Cap on training pairs (0: all)."""
    num_eval: int = 200
    """Held-out pairs evaluated during training (a cap for synthetic / esci)."""
    labels: list[str] = field(default_factory=lambda: list(ESCI_NAMES))
    """Label names, most relevant first (any graded scale; synthetic needs ESCI's four)."""
    codes: list[str] = field(default_factory=lambda: list(ESCI_CODES))
    """Short codes the annotator answers with, same order (empty: the names). Must match
    reward.relevance.codes."""
    prompt: RelevancePromptConfig = field(default_factory=RelevancePromptConfig)
    """The annotator's prompt template."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """source=synthetic: the generator's settings."""

    def label_set(self) -> LabelSet:
        return LabelSet.of(self.labels, self.codes)


def _relevance_cfg(data_section: Any) -> RelevanceDataConfig:
    cfg = data_section.relevance
    if cfg.source not in ("synthetic", "file", "esci"):
        raise ValueError(f"data.relevance.source={cfg.source!r}: synthetic, file or esci")
    if cfg.source == "synthetic" and LabelSet.of(cfg.labels, cfg.codes).names != ESCI_NAMES:
        raise ValueError(
            "data.relevance.source=synthetic labels by ESCI's four grades; a custom label set "
            f"({', '.join(cfg.labels)}) needs source=file or esci"
        )
    if cfg.source in ("file", "esci") and not cfg.path:
        raise ValueError(f"data.relevance.source={cfg.source} needs data.relevance.path")
    if cfg.source == "esci" and not cfg.products_path:
        raise ValueError("data.relevance.source=esci needs data.relevance.products_path")
    return cfg


def relevance_records(data_section: Any) -> tuple[list[RelevanceRecord], list[RelevanceRecord]]:
    """(train, held-out) labelled pairs of `data_section.relevance`."""
    cfg = _relevance_cfg(data_section)
    labels = cfg.label_set()
    if cfg.source == "synthetic":
        splits = generate_synthetic(cfg.synthetic, data_section.seed)
        train, held = splits["train"], splits["eval"][: cfg.num_eval]
    elif cfg.source == "file":
        rows = load_records(cfg.path, labels)
        if cfg.eval_path:
            train, held = rows, load_records(cfg.eval_path, labels)[: cfg.num_eval]
        else:
            held, train = rows[: cfg.num_eval], rows[cfg.num_eval :]
    else:
        kw = dict(locale=cfg.esci_locale, version=cfg.esci_version, labels=labels)
        train = load_esci(cfg.path, cfg.products_path, split="train", **kw)
        held = load_esci(cfg.path, cfg.products_path, split="test", **kw)[: cfg.num_eval]
    if cfg.num_train:
        train = train[: cfg.num_train]
    return train, held


def relevance_examples(data_section: Any) -> tuple[list[PromptExample], list[PromptExample]]:
    """The trainer's (train, held-out) prompts for data.kind=relevance. `data_section` is the
    trainer's DataSection (its `seed` seeds the synthetic generator; its `relevance` holds
    the rest)."""
    cfg = _relevance_cfg(data_section)
    labels = cfg.label_set()
    train, held = relevance_records(data_section)
    src = f"relevance-{cfg.source}"
    return (
        [to_prompt_example(r, i, cfg.prompt, labels, src) for i, r in enumerate(train)],
        [to_prompt_example(r, i, cfg.prompt, labels, src) for i, r in enumerate(held)],
    )


def warmstart_examples(data_section: Any) -> tuple[list[PromptExample], list[PromptExample]]:
    """The tiny policy's supervised warm start for data.kind=relevance: (train, held) where
    held is up to 64 pairs of the held-out split, to report greedy accuracy."""
    cfg = _relevance_cfg(data_section)
    labels = cfg.label_set()
    if cfg.source == "synthetic":
        rows = generate_synthetic(cfg.synthetic, data_section.seed)["warmstart"]
    elif cfg.warmstart_path:
        rows = load_records(cfg.warmstart_path, labels)
    else:
        raise ValueError(
            f"data.relevance.source={cfg.source}: the tiny model's warm start needs "
            "data.relevance.warmstart_path (labelled pairs)"
        )
    _, held = relevance_records(data_section)
    mk = to_prompt_example
    return (
        [mk(r, i, cfg.prompt, labels, "relevance-warmstart") for i, r in enumerate(rows)],
        [mk(r, i, cfg.prompt, labels, "relevance-eval") for i, r in enumerate(held[:64])],
    )


def warmstart_fingerprint(data_section: Any) -> str:
    """A digest of the warm-start pairs as prompts and answers: part of the tiny model's cache
    key, so a different split, template or label set never reuses a cached warm start."""
    train, held = warmstart_examples(data_section)
    h = hashlib.sha256()
    for ex in (*train, *held):
        h.update(json.dumps([ex.messages, ex.ground_truth]).encode())
    return h.hexdigest()[:16]
