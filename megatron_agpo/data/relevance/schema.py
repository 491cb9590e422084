"""The pairs: an ordered `LabelSet` of graded labels, a `RelevanceRecord` per (query, item)
pair, and the JSONL / JSON / parquet files that hold them (`load_records`, `write_records`);
a bad row raises `DataValidationError` naming the file, the row and the field."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_agpo.data.files import read_rows
from megatron_agpo.data.records import DataValidationError

ESCI_NAMES = ("Exact", "Substitute", "Complement", "Irrelevant")
ESCI_CODES = ("E", "S", "C", "I")
ATTRIBUTES = ("brand", "category", "type", "price")


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
