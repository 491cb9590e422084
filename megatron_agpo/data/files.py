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
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} row {index} (line {line_no})"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataValidationError(
                    f"{where}: invalid JSON: {e.msg} at column {e.colno}"
                ) from None
            yield index, where, row
            index += 1


def _json_array(path: Path) -> Iterator[tuple[int, str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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
