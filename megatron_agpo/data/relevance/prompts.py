"""How a pair becomes the annotator's chat (`render_prompt`, from the configurable template)
and a trainer prompt whose ground truth is the label's code (`to_prompt_example`). The answer
format the reward reads is ``\\boxed{<code>}`` (megatron_agpo.rewards.relevance)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_agpo.data.records import DataValidationError, PromptExample
from megatron_agpo.data.relevance.schema import ATTRIBUTES, LabelSet, RelevanceRecord


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

    def problems(self, prefix: str = "prompt.") -> list[str]:
        """The template's problems, one line each naming the key."""
        import string

        out = []
        bad = [f for f in self.item_fields if f not in ATTRIBUTES]
        if bad:
            out.append(f"{prefix}item_fields: {bad[0]!r} is not one of {', '.join(ATTRIBUTES)}")
        try:
            names = {n for _, n, _, _ in string.Formatter().parse(self.template) if n}
        except ValueError as e:
            out.append(f"{prefix}template: {e}")
        else:
            unknown = sorted(names - set(_PLACEHOLDERS))
            if unknown:
                out.append(
                    f"{prefix}template: unknown placeholder {{{unknown[0]}}} (known: "
                    f"{', '.join(_PLACEHOLDERS)})"
                )
        return out


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
