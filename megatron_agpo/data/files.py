"""Rows of the files people keep datasets in: JSONL, a JSON array, parquet.

One reader for training prompts (`megatron_agpo.data.loaders`) and evaluation benchmarks
(`megatron_agpo.eval.benchmarks`), so both name a bad row the same way:
"<file> row <i> (line <n>)", i counting rows from 0 (blank JSONL lines are not rows).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_agpo.data.records import DataValidationError

SUFFIXES = (".jsonl", ".json", ".parquet")


def read_rows(path: str | Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(row index, location for messages, row) of each object row of path.

    A .json file holds an array of objects (or {"data": [...]}, as some releases wrap it).
    A row that is not an object, or a line that is not JSON, raises DataValidationError
    naming it; nothing is skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl(path)
    elif suffix == ".json":
        rows = _json_array(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = ((i, f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist()))
    else:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r} (expected one of {', '.join(SUFFIXES)})"
        )
    for index, where, row in rows:
        if not isinstance(row, dict):
            raise DataValidationError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield index, where, row


def _jsonl(path: Path) -> Iterator[tuple[int, str, Any]]:
    index = 0
    # Bytes, decoded line by line: a bad byte is reported with its row and line (a text-mode
    # read would raise a bare UnicodeDecodeError from somewhere in an 8 KB block).
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path} row {index} (line {line_no})"
            line = _decode(raw, where, first=line_no == 1)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataValidationError(
                    f"{where}: invalid JSON: {e.msg} at column {e.colno}"
                ) from None
            yield index, where, row
            index += 1


def _decode(raw: bytes, where: str, first: bool = False) -> str:
    """UTF-8 text of `raw` (a leading BOM on the first line dropped), or an error naming the
    byte."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        raise DataValidationError(
            f"{where}: not UTF-8 text (byte 0x{bad} at column {e.start + 1}); "
            f"re-encode the file as UTF-8"
        ) from None


def _json_array(path: Path) -> Iterator[tuple[int, str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataValidationError(
            f"{path} (line {line}): not UTF-8 text (byte 0x{raw[e.start : e.start + 1].hex()}); "
            f"re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataValidationError(f"{path}: the file is empty (expected a JSON array of objects)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataValidationError(
            f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataValidationError(f"{path}: expected a JSON array of objects (or use JSONL)")
    for i, row in enumerate(data):
        yield i, f"{path} row {i}", row
