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
from megatron_agpo.registry import require_valid


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

    def problems(self, prefix: str = "data.relevance.") -> list[str]:
        """This section's problems, one line each naming the key (the files themselves are
        read by `megatron_agpo.validate.preflight`); the prompt template reports its own."""
        out: list[str] = []
        if self.source not in ("synthetic", "file", "esci"):
            out.append(f"{prefix}source={self.source!r}: synthetic, file or esci")
        try:
            labels = self.label_set()
        except ValueError as e:
            out.append(f"{prefix}labels / {prefix}codes: {e}")
            labels = None
        if self.source == "synthetic" and labels is not None and labels.names != ESCI_NAMES:
            out.append(
                f"{prefix}source=synthetic labels by ESCI's four grades; a custom label set "
                f"({', '.join(self.labels)}) needs source=file or esci"
            )
        if self.source in ("file", "esci") and not self.path:
            out.append(f"{prefix}source={self.source} needs {prefix}path")
        if self.source == "esci" and not self.products_path:
            out.append(f"{prefix}source=esci needs {prefix}products_path")
        for key in ("num_train", "num_eval"):
            if getattr(self, key) < 0:
                out.append(f"{prefix}{key}={getattr(self, key)}: must be >= 0")
        return out


def _relevance_cfg(data_section: Any) -> RelevanceDataConfig:
    cfg = data_section.relevance
    require_valid(cfg, "data.relevance.")
    require_valid(cfg.prompt, "data.relevance.prompt.")
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
