"""Search-ads relevance data: query-item pairs with a graded label, as prompts for an annotator.

A `RelevanceRecord` is one (query, item) pair: the item's title and optional attributes
(brand, category, type, price), a graded label from an ordered `LabelSet` (most relevant
first; default ESCI's Exact / Substitute / Complement / Irrelevant) or none for an unlabelled
pool, and an optional query id for ranking metrics. Sources:

- files: JSONL / JSON / parquet rows ``{query, title, label?, query_id?, id?, brand?,
  category?, type?, price?}`` (`load_records`); a bad row raises `DataValidationError`
  naming the file, the row and the field;
- the Amazon ESCI release (`load_esci`): ``shopping_queries_dataset_examples.parquet``
  joined with ``shopping_queries_dataset_products.parquet`` on (product_id, product_locale);
- a seeded synthetic catalogue (`generate_synthetic`), since no relevance data set is
  installable here. Its words come from this module's own short lists (fictional brands, a
  few product types and their accessories), and its gold labels follow stated rules; see
  `generate_synthetic`.

`render_prompt` turns a record into the chat the annotator answers (the configurable
template), and `relevance_examples` gives the trainer its (train, held-out) `PromptExample`
lists. The answer format the reward reads is ``\\boxed{<code>}`` (megatron_agpo.rewards.relevance).

This module must not import megatron_agpo.trainer at module level: the trainer's config
imports the dataclasses below.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_agpo.data.files import read_rows
from megatron_agpo.data.records import DataValidationError, PromptExample

ESCI_NAMES = ("Exact", "Substitute", "Complement", "Irrelevant")
ESCI_CODES = ("E", "S", "C", "I")
ATTRIBUTES = ("brand", "category", "type", "price")
SPLITS = ("warmstart", "train", "eval", "pool", "test")


# ---------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of graded labels, most relevant first. Each label has a name (what files
    hold) and a short code (what the annotator answers); either is accepted on input."""

    names: tuple[str, ...] = ESCI_NAMES
    codes: tuple[str, ...] = ESCI_CODES

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise ValueError(f"a label set needs at least 2 labels, got {list(self.names)}")
        if len(self.codes) != len(self.names):
            raise ValueError(
                f"labels {list(self.names)} and codes {list(self.codes)} differ in length"
            )
        keys = [s.strip().lower() for s in (*self.names, *self.codes)]
        if any(not k for k in keys):
            raise ValueError("label names and codes must be non-empty")
        # A code may equal its own name; nothing else may collide.
        owners: dict[str, int] = {}
        for i, (n, c) in enumerate(zip(self.names, self.codes, strict=True)):
            for k in {n.strip().lower(), c.strip().lower()}:
                if owners.setdefault(k, i) != i:
                    raise ValueError(f"label {k!r} is used twice in {list(self.names)}")
            if any(ch in c for ch in "{}\\"):
                raise ValueError(f"label code {c!r} may not contain braces or backslashes")

    @classmethod
    def of(cls, names: Sequence[str], codes: Sequence[str] = ()) -> LabelSet:
        """From config lists; empty codes: the names themselves."""
        return cls(tuple(names), tuple(codes) if codes else tuple(names))

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self, value: str) -> int | None:
        """Index of a label given by name or code (case and surrounding space ignored)."""
        key = value.strip().lower()
        for i, (n, c) in enumerate(zip(self.names, self.codes, strict=True)):
            if key in (n.lower(), c.lower()):
                return i
        return None

    def gain(self, index: int) -> int:
        """Graded gain for ranking metrics: K-1 for the first label down to 0 for the last."""
        return len(self.names) - 1 - index


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class RelevanceRecord:
    """One query-item pair."""

    id: str
    """Unique id of the pair (the file's `id`, else `<file stem>-<row>`)."""
    query: str
    """The search query."""
    title: str
    """The item's title."""
    label: str | None = None
    """Gold label, canonical name from the label set; None for an unlabelled pair."""
    query_id: str = ""
    """Groups pairs by query for ranking metrics (empty: the query text)."""
    brand: str = ""
    category: str = ""
    type: str = ""
    price: float | None = None

    @property
    def group(self) -> str:
        """The ranking group: query_id, else the query text."""
        return self.query_id or self.query

    def to_row(self, with_label: bool = True) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id, "query": self.query, "title": self.title}
        if with_label and self.label is not None:
            row["label"] = self.label
        if self.query_id:
            row["query_id"] = self.query_id
        for a in ("brand", "category", "type"):
            if getattr(self, a):
                row[a] = getattr(self, a)
        if self.price is not None:
            row["price"] = self.price
        return row


def _str_field(row: dict, key: str, where: str, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataValidationError(f"{where}: missing field {key!r}")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataValidationError(
            f"{where}: field {key!r}: expected a string, got {type(value).__name__}"
        )
    text = str(value).strip()
    if required and not text:
        raise DataValidationError(f"{where}: field {key!r} is empty")
    return text


def parse_record(
    row: dict, where: str, labels: LabelSet, default_id: str, require_label: bool
) -> RelevanceRecord:
    """A file row -> RelevanceRecord; errors name `where` (file and row) and the field."""
    query = _str_field(row, "query", where, True)
    title = _str_field(row, "title", where, True)
    label = None
    raw = row.get("label")
    if raw is None:
        if require_label:
            raise DataValidationError(f"{where}: missing field 'label'")
    else:
        if not isinstance(raw, str):
            raise DataValidationError(
                f"{where}: field 'label': expected a string, got {type(raw).__name__}"
            )
        i = labels.lookup(raw)
        if i is None:
            raise DataValidationError(
                f"{where}: field 'label': {raw!r} is not one of {', '.join(labels.names)} "
                f"(or codes {', '.join(labels.codes)})"
            )
        label = labels.names[i]
    price = row.get("price")
    if price is not None:
        if isinstance(price, bool) or not isinstance(price, (int, float)):
            raise DataValidationError(
                f"{where}: field 'price': expected a number, got {type(price).__name__}"
            )
        if not math.isfinite(price) or price < 0:
            raise DataValidationError(f"{where}: field 'price': {price} is not a price")
        price = float(price)
    return RelevanceRecord(
        id=_str_field(row, "id", where, False) or default_id,
        query=query,
        title=title,
        label=label,
        query_id=_str_field(row, "query_id", where, False),
        brand=_str_field(row, "brand", where, False),
        category=_str_field(row, "category", where, False),
        type=_str_field(row, "type", where, False),
        price=price,
    )


def load_records(
    path: str | Path, labels: LabelSet | None = None, require_label: bool = True
) -> list[RelevanceRecord]:
    """Rows of a JSONL / JSON / parquet file. Pair ids must be unique within the file."""
    labels = labels or LabelSet()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such relevance data file")
    out: list[RelevanceRecord] = []
    seen: dict[str, int] = {}
    for index, where, row in read_rows(path):
        rec = parse_record(row, where, labels, f"{path.stem}-{index}", require_label)
        if rec.id in seen:
            raise DataValidationError(
                f"{where}: field 'id': {rec.id!r} already used by row {seen[rec.id]}"
            )
        seen[rec.id] = index
        out.append(rec)
    return out


def write_records(
    records: Iterable[RelevanceRecord], path: str | Path, with_labels: bool = True
) -> Path:
    """JSONL (or parquet, by suffix) that `load_records` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.to_row(with_labels) for r in records]
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Every row gets every column (from_pylist takes the columns of the first row only).
        keys = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- ESCI

ESCI_EXAMPLE_COLUMNS = ("example_id", "query", "query_id", "product_id", "product_locale")
ESCI_PRODUCT_COLUMNS = ("product_id", "product_locale", "product_title")


def _read_table(path: Path, needed: Sequence[str]) -> dict[str, list]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ESCI file")
    table = pq.read_table(path)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataValidationError(
            f"{path}: missing column {missing[0]!r} (the ESCI layout has "
            f"{', '.join(needed)}; this file has {', '.join(table.column_names)})"
        )
    return table.to_pydict()


def load_esci(
    examples_path: str | Path,
    products_path: str | Path,
    *,
    locale: str = "us",
    split: str = "",
    version: str = "small",
    labels: LabelSet | None = None,
) -> list[RelevanceRecord]:
    """Pairs of the Shopping Queries (ESCI) release, in its parquet layout.

    examples: example_id, query, query_id, product_id, product_locale, esci_label (E, S, C,
    I), small_version, large_version, split (train/test). products: product_id,
    product_locale, product_title, product_brand (others ignored). `locale`: us, es or jp
    (empty: all); `split`: train, test or empty (all); `version`: small (the task-1 subset),
    large or all. ESCI's letters map to `labels` through the names Exact, Substitute,
    Complement, Irrelevant, which the label set must contain.
    """
    labels = labels or LabelSet()
    if version not in ("small", "large", "all"):
        raise ValueError(f"ESCI version={version!r}: small, large or all")
    ex_path, pr_path = Path(examples_path), Path(products_path)
    needed = [*ESCI_EXAMPLE_COLUMNS, "esci_label"]
    if split:
        needed.append("split")
    if version != "all":
        needed.append(f"{version}_version")
    ex = _read_table(ex_path, needed)
    pr = _read_table(pr_path, ESCI_PRODUCT_COLUMNS)
    letter_to_label: dict[str, str] = {}
    for code, name in zip(ESCI_CODES, ESCI_NAMES, strict=True):
        i = labels.lookup(name)
        if i is None:
            raise ValueError(
                f"ESCI labels need {', '.join(ESCI_NAMES)} in the label set, "
                f"which is {', '.join(labels.names)}"
            )
        letter_to_label[code] = labels.names[i]
    brands = pr.get("product_brand") or [None] * len(pr["product_id"])
    products = {
        (pid, loc): (title, brand)
        for pid, loc, title, brand in zip(
            pr["product_id"], pr["product_locale"], pr["product_title"], brands, strict=True
        )
    }
    out: list[RelevanceRecord] = []
    for i in range(len(ex["example_id"])):
        where = f"{ex_path} row {i}"
        if locale and ex["product_locale"][i] != locale:
            continue
        if split and ex["split"][i] != split:
            continue
        if version != "all" and not ex[f"{version}_version"][i]:
            continue
        letter = ex["esci_label"][i]
        if letter not in letter_to_label:
            raise DataValidationError(
                f"{where}: field 'esci_label': {letter!r} is not one of E, S, C, I"
            )
        key = (ex["product_id"][i], ex["product_locale"][i])
        if key not in products:
            raise DataValidationError(
                f"{where}: field 'product_id': {key[0]!r} (locale {key[1]!r}) is not in {pr_path}"
            )
        title, brand = products[key]
        if not isinstance(title, str) or not title.strip():
            raise DataValidationError(
                f"{where}: field 'product_id': product {key[0]!r} has no product_title in {pr_path}"
            )
        query = ex["query"][i]
        if not isinstance(query, str) or not query.strip():
            raise DataValidationError(f"{where}: field 'query' is empty")
        out.append(
            RelevanceRecord(
                id=str(ex["example_id"][i]),
                query=query.strip(),
                title=title.strip(),
                label=letter_to_label[letter],
                query_id=str(ex["query_id"][i]),
                brand=(brand or "").strip() if isinstance(brand, str) else "",
            )
        )
    return out


# ---------------------------------------------------------------- synthetic catalogue

BRANDS = ("zenta", "kolo", "vexa", "orbi", "lumo", "tarn", "pivo", "quil", "maro", "sela")
"""Fictional brands (this module's own list). Each has a near-miss twin (one letter changed,
see `near_miss`) that is a different brand in the catalogue."""
PRODUCT_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    # type: (category, accessories). Accessory words are shared across types on purpose
    # ("case", "bag", "stand"): an accessory of another type shares words with the query
    # but is Irrelevant.
    "phone": ("electronics", ("case", "charger")),
    "laptop": ("computers", ("bag", "stand")),
    "camera": ("electronics", ("case", "lens")),
    "watch": ("electronics", ("strap", "charger")),
    "drill": ("tools", ("bits", "case")),
    "bike": ("sports", ("helmet", "pump")),
    "tablet": ("computers", ("stand", "case")),
    "kettle": ("kitchen", ("filter", "base")),
}
MODELS = ("x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9")
COLOURS = ("red", "blue", "black", "white")


def near_miss(brand: str) -> str:
    """The brand's knock-off twin, its second letter moved one step on within vowels or
    consonants (zenta -> zinta, orbi -> osbi)."""
    vowels, consonants = "aeiou", "bcdfghjklmnpqrstvwxyz"
    c = brand[1]
    pool = vowels if c in vowels else consonants
    return brand[0] + pool[(pool.index(c) + 1) % len(pool)] + brand[2:]


@dataclass
class SyntheticConfig:
    """The seeded synthetic catalogue and its queries (`generate_synthetic`)."""

    queries: list[int] = field(default_factory=lambda: [60, 150, 30, 200, 60])
    """Queries per split: warmstart, train, eval, pool, test (splits share no query)."""
    pairs_per_query: int = 10
    """Items judged per query (the ranking list of NDCG@10)."""
    mix: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.15, 0.25])
    """Share of Exact, Substitute, Complement, Irrelevant items per query (drawn)."""
    hard_fraction: float = 0.5
    """Share of Substitute, Complement and Irrelevant items drawn as hard cases: near-miss
    brand, model-number mismatch, same brand's accessory, same brand and model of another
    type, another type's accessory sharing a word with the query's type."""
    model_in_query: float = 0.85
    """Share of queries that name a model number (others match any model)."""
    label_noise: float = 0.0
    """Share of labels in the warmstart and train splits replaced by another label drawn
    uniformly (noisy human labels); eval, pool and test labels stay gold."""


def _gold(q: dict, item: dict) -> str:
    """The labelling rules, applied to what the generator knows about query and item."""
    if item["kind"] == "main" and item["type"] == q["type"]:
        if item["brand"] == q["brand"] and (q["model"] is None or item["model"] == q["model"]):
            return "Exact"
        return "Substitute"  # another brand (near-miss included) or another model number
    if item["kind"] == "accessory" and item["for"] == q["type"]:
        return "Complement"
    return "Irrelevant"


def _item(kind: str, brand: str, ptype: str, model_or_acc: str, rng: random.Random) -> dict:
    if kind == "main":
        cat = PRODUCT_TYPES[ptype][0]
        return {
            "kind": "main",
            "brand": brand,
            "type": ptype,
            "model": model_or_acc,
            # A colour makes several Exact items per query possible (the same product, in
            # another colour, is still the product asked for).
            "title": f"{brand} {ptype} {model_or_acc} {rng.choice(COLOURS)}",
            "category": cat,
            "price": float(rng.randrange(50, 900)),
        }
    return {
        "kind": "accessory",
        "brand": brand,
        "type": model_or_acc,
        "for": ptype,
        "model": None,
        "title": f"{brand} {ptype} {model_or_acc}",
        "category": "accessories",
        "price": float(rng.randrange(5, 60)),
    }


def _draw_item(q: dict, want: str, hard: bool, rng: random.Random) -> dict:
    """An item whose gold label under `_gold` is `want` (checked by the caller)."""
    b, t, m = q["brand"], q["type"], q["model"]
    all_brands = list(BRANDS) + [near_miss(x) for x in BRANDS]
    other_brands = [x for x in all_brands if x != b]
    other_types = [x for x in PRODUCT_TYPES if x != t]
    if want == "Exact":
        return _item("main", b, t, m or rng.choice(MODELS), rng)
    if want == "Substitute":
        if hard and m is not None and rng.random() < 0.5:
            return _item("main", b, t, rng.choice([x for x in MODELS if x != m]), rng)
        brand = near_miss(b) if hard else rng.choice(other_brands)
        return _item("main", brand, t, m or rng.choice(MODELS), rng)
    if want == "Complement":
        brand = b if hard else rng.choice(all_brands)
        return _item("accessory", brand, t, rng.choice(PRODUCT_TYPES[t][1]), rng)
    # Irrelevant
    if hard:
        if rng.random() < 0.5:  # same brand and model number, another product type
            return _item("main", b, rng.choice(other_types), m or rng.choice(MODELS), rng)
        shared = [
            (ot, acc) for ot in other_types for acc in PRODUCT_TYPES[ot][1]
            if acc in PRODUCT_TYPES[t][1]
        ]  # fmt: skip
        if shared:  # another type's accessory with the same accessory word, same brand
            ot, acc = rng.choice(shared)
            return _item("accessory", b, ot, acc, rng)
    ot = rng.choice(other_types)
    if rng.random() < 0.5:
        return _item("main", rng.choice(all_brands), ot, rng.choice(MODELS), rng)
    return _item("accessory", rng.choice(all_brands), ot, rng.choice(PRODUCT_TYPES[ot][1]), rng)


def all_queries() -> list[tuple[str, str, str | None]]:
    """Every query the generator can ask: (brand, type, model or None)."""
    return [
        (b, t, m) for b in BRANDS for t in PRODUCT_TYPES for m in (*MODELS, None)
    ]  # fmt: skip


def generate_synthetic(cfg: SyntheticConfig, seed: int = 0) -> dict[str, list[RelevanceRecord]]:
    """Seeded catalogue pairs for the five splits (`SPLITS`), labelled by these rules:

    - an item of the queried product type, same brand, and the query's model number if it
      names one: **Exact**;
    - an item of the queried type with another brand (near-miss spellings included) or
      another model number: **Substitute**;
    - an accessory made for the queried type (any brand): **Complement**;
    - anything else (another type, even of the same brand and model; another type's
      accessory, even one sharing the accessory word): **Irrelevant**.

    Hard cases (`hard_fraction`) make word overlap misleading: a near-miss brand or a
    one-character model mismatch is a Substitute although it shares almost every character;
    "zenta drill x3" for "zenta phone x3" is Irrelevant although it shares two of three words.
    Queries are drawn without replacement, so splits never share a query.
    """
    if len(cfg.queries) != len(SPLITS):
        raise ValueError(f"synthetic.queries needs {len(SPLITS)} counts ({', '.join(SPLITS)})")
    if len(cfg.mix) != 4 or any(x < 0 for x in cfg.mix) or sum(cfg.mix) <= 0:
        raise ValueError(f"synthetic.mix needs 4 non-negative shares (E, S, C, I), got {cfg.mix}")
    for name in ("hard_fraction", "model_in_query", "label_noise"):
        v = getattr(cfg, name)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"synthetic.{name}={v} must be in [0, 1]")
    if cfg.pairs_per_query < 1:
        raise ValueError(f"synthetic.pairs_per_query={cfg.pairs_per_query} must be >= 1")
    rng = random.Random(seed)
    with_model = [q for q in all_queries() if q[2] is not None]
    without = [q for q in all_queries() if q[2] is None]
    rng.shuffle(with_model)
    rng.shuffle(without)
    total = sum(cfg.queries)
    n_with = round(total * cfg.model_in_query)
    if n_with > len(with_model) or total - n_with > len(without):
        raise ValueError(
            f"synthetic.queries asks for {total} queries; the catalogue has "
            f"{len(with_model)} with a model number and {len(without)} without"
        )
    picked = with_model[:n_with] + without[: total - n_with]
    rng.shuffle(picked)
    out: dict[str, list[RelevanceRecord]] = {}
    start = 0
    for split, count in zip(SPLITS, cfg.queries, strict=True):
        records: list[RelevanceRecord] = []
        for qi, (b, t, m) in enumerate(picked[start : start + count]):
            q = {"brand": b, "type": t, "model": m}
            query = f"{b} {t}" + (f" {m}" if m else "")
            qid = f"{split}-q{qi}"
            seen: set[str] = set()
            for j in range(cfg.pairs_per_query):
                for _ in range(50):  # distinct titles within a query
                    want = rng.choices(ESCI_NAMES, weights=cfg.mix)[0]
                    hard = want != "Exact" and rng.random() < cfg.hard_fraction
                    item = _draw_item(q, want, hard, rng)
                    if item["title"] not in seen:
                        break
                seen.add(item["title"])
                label = _gold(q, item)
                if split in ("warmstart", "train") and rng.random() < cfg.label_noise:
                    label = rng.choice([x for x in ESCI_NAMES if x != label])
                records.append(
                    RelevanceRecord(
                        id=f"{qid}-{j}",
                        query=query,
                        title=item["title"],
                        label=label,
                        query_id=qid,
                        brand=item["brand"],
                        category=item["category"],
                        type=item["type"],
                        price=item["price"],
                    )
                )
        out[split] = records
        start += count
    return out


# ---------------------------------------------------------------- prompts


@dataclass
class RelevancePromptConfig:
    """How a pair becomes the annotator's chat: an optional system turn and one user turn
    rendered from `template`, then the model's own chat template (applied by the trainer's
    `encode_prompts` and by `agpo-annotate`)."""

    template: str = "{instruction}{definitions}q:{query}|i:{item}|"
    """The user turn. Placeholders: {instruction}, {definitions} (one line per label, see
    `definitions`), {labels} (the codes joined by "/"), {query}, {item} (title then the
    `item_fields`), {title}, {brand}, {category}, {type}, {price}. The default is compact for
    the tiny character-level model (64-token context)."""
    instruction: str = ""
    """Text for {instruction}, e.g. "Rate how relevant the item is to the search query.
    Answer with one label in \\\\boxed{}.\\n". Empty for the tiny model."""
    definitions: list[str] = field(default_factory=list)
    """One definition per label (same order as the labels); rendered into {definitions} as
    "<code> = <name>: <definition>" lines. Empty: {definitions} is empty."""
    item_fields: list[str] = field(default_factory=list)
    """Attributes appended to the title in {item}, as "name=value" (brand, category, type,
    price); empty: the title alone."""
    system: str = ""
    """A system turn before the user turn (empty: none)."""

    def __post_init__(self) -> None:
        bad = [f for f in self.item_fields if f not in ATTRIBUTES]
        if bad:
            raise ValueError(
                f"prompt.item_fields: {bad[0]!r} is not one of {', '.join(ATTRIBUTES)}"
            )


_PLACEHOLDERS = ("instruction", "definitions", "labels", "query", "item", "title", *ATTRIBUTES)


def render_prompt(
    rec: RelevanceRecord, cfg: RelevancePromptConfig, labels: LabelSet
) -> tuple[dict[str, str], ...]:
    """The chat (messages) the annotator answers for one pair."""
    if cfg.definitions and len(cfg.definitions) != len(labels):
        raise ValueError(
            f"prompt.definitions has {len(cfg.definitions)} entries for {len(labels)} labels"
        )
    attrs = {
        "brand": rec.brand,
        "category": rec.category,
        "type": rec.type,
        "price": "" if rec.price is None else f"{rec.price:g}",
    }
    item = " ".join([rec.title] + [f"{f}={attrs[f]}" for f in cfg.item_fields if attrs[f]])
    defs = "".join(
        f"{c} = {n}: {d}\n"
        for c, n, d in zip(labels.codes, labels.names, cfg.definitions, strict=False)
    )
    values = {
        "instruction": cfg.instruction,
        "definitions": defs,
        "labels": "/".join(labels.codes),
        "query": rec.query,
        "item": item,
        "title": rec.title,
        **attrs,
    }
    try:
        user = cfg.template.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"prompt.template {cfg.template!r}: {e!r}; placeholders are "
            f"{', '.join('{' + p + '}' for p in _PLACEHOLDERS)}"
        ) from None
    msgs = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return (*msgs, {"role": "user", "content": user})


def to_prompt_example(
    rec: RelevanceRecord,
    index: int,
    cfg: RelevancePromptConfig,
    labels: LabelSet,
    source: str,
) -> PromptExample:
    """A labelled pair as a trainer prompt: ground truth is the label's code (what the
    reward compares the boxed answer with)."""
    if rec.label is None:
        raise DataValidationError(f"{source}: pair {rec.id!r} has no label")
    i = labels.lookup(rec.label)
    if i is None:
        raise DataValidationError(f"{source}: pair {rec.id!r}: label {rec.label!r} not in set")
    messages = render_prompt(rec, cfg, labels)
    return PromptExample(
        index=index,
        messages=messages,
        problem=messages[-1]["content"],
        ground_truth=labels.codes[i],
        source=source,
        metadata={"id": rec.id, "query_id": rec.group, "label": rec.label},
    )


# ---------------------------------------------------------------- the trainer's entry points


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
