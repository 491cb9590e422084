"""Search-ads relevance data: query-item pairs with a graded label, as prompts for an annotator.

A `RelevanceRecord` is one (query, item) pair: the item's title and optional attributes
(brand, category, type, price), a graded label from an ordered `LabelSet` (most relevant
first; default ESCI's Exact / Substitute / Complement / Irrelevant) or none for an unlabelled
pool, and an optional query id for ranking metrics. Sources:

- files: JSONL / JSON / parquet rows ``{query, title, label?, query_id?, id?, brand?,
  category?, type?, price?}`` (`schema.load_records`); a bad row raises `DataValidationError`
  naming the file, the row and the field;
- the Amazon ESCI release (`esci.load_esci`): ``shopping_queries_dataset_examples.parquet``
  joined with ``shopping_queries_dataset_products.parquet`` on (product_id, product_locale);
- a seeded synthetic catalogue (`synthetic.generate_synthetic`), since no relevance data set
  is installable here. Its words come from that module's own short lists (fictional brands, a
  few product types and their accessories), and its gold labels follow stated rules; see
  `generate_synthetic`.

`prompts.render_prompt` turns a record into the chat the annotator answers (the configurable
template), and `section.relevance_examples` gives the trainer its (train, held-out)
`PromptExample` lists (`section.warmstart_examples`: the tiny policy's warm start).
The answer format the reward reads is ``\\boxed{<code>}`` (megatron_agpo.rewards.relevance).

Nothing here imports megatron_agpo.trainer, torch or pyarrow at module level: the trainer's
config imports `RelevanceDataConfig` from this package (pyarrow is imported where a parquet
file is read or written).
"""

from __future__ import annotations

from megatron_agpo.data.relevance.esci import (
    ESCI_EXAMPLE_COLUMNS,
    ESCI_PRODUCT_COLUMNS,
    load_esci,
)
from megatron_agpo.data.relevance.prompts import (
    RelevancePromptConfig,
    render_prompt,
    to_prompt_example,
)
from megatron_agpo.data.relevance.schema import (
    ATTRIBUTES,
    ESCI_CODES,
    ESCI_NAMES,
    LabelSet,
    RelevanceRecord,
    load_records,
    parse_record,
    write_records,
)
from megatron_agpo.data.relevance.section import (
    RelevanceDataConfig,
    relevance_examples,
    relevance_records,
    warmstart_examples,
    warmstart_fingerprint,
)
from megatron_agpo.data.relevance.synthetic import (
    BRANDS,
    COLOURS,
    MODELS,
    PRODUCT_TYPES,
    SPLITS,
    SyntheticConfig,
    all_queries,
    generate_synthetic,
    near_miss,
)

__all__ = [
    "ATTRIBUTES",
    "BRANDS",
    "COLOURS",
    "ESCI_CODES",
    "ESCI_EXAMPLE_COLUMNS",
    "ESCI_NAMES",
    "ESCI_PRODUCT_COLUMNS",
    "LabelSet",
    "MODELS",
    "PRODUCT_TYPES",
    "RelevanceDataConfig",
    "RelevancePromptConfig",
    "RelevanceRecord",
    "SPLITS",
    "SyntheticConfig",
    "all_queries",
    "generate_synthetic",
    "load_esci",
    "load_records",
    "near_miss",
    "parse_record",
    "relevance_examples",
    "relevance_records",
    "render_prompt",
    "to_prompt_example",
    "warmstart_examples",
    "warmstart_fingerprint",
    "write_records",
]
