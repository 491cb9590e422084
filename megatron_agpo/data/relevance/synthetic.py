"""A seeded synthetic catalogue, since no relevance data set is installable here: its words
come from this module's own short lists (fictional brands, a few product types and their
accessories), and its gold labels follow stated rules (see `generate_synthetic`)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from megatron_agpo.data.relevance.schema import ESCI_NAMES, RelevanceRecord

SPLITS = ("warmstart", "train", "eval", "pool", "test")

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
