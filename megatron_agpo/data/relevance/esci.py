"""The Amazon Shopping Queries (ESCI) release: its examples parquet joined with its products
parquet on (product_id, product_locale), as `RelevanceRecord`s."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatron_agpo.data.records import DataValidationError
from megatron_agpo.data.relevance.schema import ESCI_CODES, ESCI_NAMES, LabelSet, RelevanceRecord

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
