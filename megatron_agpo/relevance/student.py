"""The student: a small BERT-style cross-encoder trained from scratch on annotated pairs.

The pair is encoded as ``[CLS] query [SEP] item [SEP]`` by a word-level
tokenizer whose vocabulary is built from the training pairs (words seen fewer than
`min_count` times map to [UNK]); transformers' `BertForSequenceClassification` predicts the
label. Segment ids carry, besides the side (query 0, item 1), an exact-match bit (+2 for a
word found on the other side too: DrQA's feature), so that an encoder trained from scratch
on a few thousand pairs learns term matching; which words matter (brand, type, model number,
accessory words) it still has to learn. Training is cross-entropy, optionally weighted by
each annotation's confidence (the annotator's vote share). The ranking score of an item is
its expected gain under the predicted distribution, sum_i p_i * gain_i, so NDCG uses the
whole distribution rather than the argmax alone.

The classifier reads the [CLS] vector and the mean of every token's final vector
(`pooling="cls+mean"`, the default). With the [CLS] vector alone (BERT's pooler,
`pooling="cls"`, what this student had until 2026-12-05) the encoder learns the labels'
features one at a time, each after a plateau of the loss: first "same product type or not"
(loss 1.245 on labels with 50% of them replaced at random), then Exact against Substitute,
then Complement. On noisy labels it stayed on such a plateau for its whole budget in about
half of the seeds, and what it then predicts is the plateau's coarse rule (the item's shape:
a product, Substitute; an accessory, Complement), the same whichever labels it was given:
docs/results/relevance.md, "Why the students collapsed". The mean over tokens gives every
token's vector a direct path to the loss; with it no plateau outlasted 6 epochs in the
calibration runs.

No pretrained encoder ships in a package on this machine's index, hence from scratch; a
pretrained one would be loaded the same way through `BertForSequenceClassification`.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from megatron_agpo.data.relevance import LabelSet, RelevanceRecord
from megatron_agpo.relevance.metrics import classification_metrics, ndcg_per_query

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
POOLINGS = ("cls+mean", "cls")
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class StudentConfig:
    """The cross-encoder and its training."""

    hidden: int = 64
    """Encoder width."""
    layers: int = 2
    """Transformer layers."""
    heads: int = 2
    """Attention heads."""
    ffn: int = 128
    """Feed-forward width."""
    max_len: int = 48
    """Longest input in tokens ([CLS] query [SEP] item [SEP]); longer items are cut."""
    min_count: int = 1
    """Words seen fewer times in the training pairs map to [UNK]."""
    epochs: int = 8
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per optimizer step."""
    lr: float = 2e-3
    """AdamW learning rate (linear decay to 10%)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    confidence_weighting: bool = False
    """Weight each pair's loss by its annotation's confidence (vote share); off: all 1."""
    item_fields: tuple[str, ...] = ()
    """Attributes appended to the title on the item side (brand, category, type, price)."""
    seed: int = 0
    """Initialisation and shuffling seed."""
    threads: int = 1
    """torch threads while training (CPU float sums depend on it: fixed for reproducibility)."""
    pooling: str = "cls+mean"
    """What the classifier reads: "cls+mean" (the [CLS] vector and the masked mean of the
    final token vectors) or "cls" (BERT's pooler alone; plateaus on noisy labels, see the
    module's docstring)."""
    dropout: float = 0.1
    """Dropout of the encoder (hidden and attention) and of the classifier's input."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"StudentConfig.pooling={self.pooling!r}: one of {POOLINGS}")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def item_text(rec: RelevanceRecord, fields: Sequence[str] = ()) -> str:
    parts = [rec.title]
    for f in fields:
        v = getattr(rec, f)
        if v not in ("", None):
            parts.append(f"{f} {v:g}" if isinstance(v, float) else f"{f} {v}")
    return " ".join(parts)


class PairTokenizer:
    """Word-level pair encoder with a vocabulary built from training pairs."""

    def __init__(self, vocab: Sequence[str]):
        self.itos = list(vocab)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Sequence[str], min_count: int = 1) -> PairTokenizer:
        counts = Counter(w for t in texts for w in words(t))
        kept = sorted(w for w, c in counts.items() if c >= min_count)
        return cls([*SPECIALS, *kept])

    def encode(self, a: str, b: str, max_len: int) -> tuple[list[int], list[int]]:
        unk = self.stoi["[UNK]"]
        ta = [self.stoi.get(w, unk) for w in words(a)]
        tb = [self.stoi.get(w, unk) for w in words(b)]
        ta = ta[: max(1, max_len // 2 - 2)]  # the query keeps at most half
        tb = tb[: max(0, max_len - len(ta) - 3)]
        ids = [self.stoi["[CLS]"], *ta, self.stoi["[SEP]"], *tb, self.stoi["[SEP]"]]
        # Segment ids with DrQA's exact-match bit: 0 / 1 for query / item words, +2 for a
        # word that also occurs on the other side ([UNK] never matches).
        sa, sb = set(ta) - {unk}, set(tb) - {unk}
        types = [0] + [2 * (t in sb) for t in ta] + [0, *(1 + 2 * (t in sa) for t in tb), 1]
        return ids, types


class PairEncoder(torch.nn.Module):
    """A BERT encoder and a linear classifier on [CLS] and the mean of the token vectors."""

    def __init__(self, config, dropout: float):
        super().__init__()
        from transformers import BertModel

        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(2 * config.hidden_size, config.num_labels)

    def forward(self, input_ids, token_type_ids, attention_mask) -> SimpleNamespace:
        h_BTH = self.bert(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
        ).last_hidden_state
        m_BT1 = attention_mask.unsqueeze(-1).to(h_BTH.dtype)
        mean_BH = (h_BTH * m_BT1).sum(1) / m_BT1.sum(1).clamp_min(1.0)
        pooled = torch.cat([h_BTH[:, 0], mean_BH], dim=-1)
        return SimpleNamespace(logits=self.head(self.drop(pooled)))

    def save_pretrained(self, out: Path, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        self.config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  str(out / "student.safetensors"))  # fmt: skip


@dataclass
class Student:
    """A trained cross-encoder: the model, its tokenizer, and how it was built."""

    model: torch.nn.Module
    tokenizer: PairTokenizer
    labels: LabelSet
    config: StudentConfig

    def _batch(self, recs: Sequence[RelevanceRecord]):
        c = self.config
        enc = [self.tokenizer.encode(r.query, item_text(r, c.item_fields), c.max_len) for r in recs]
        width = max(len(ids) for ids, _ in enc)
        ids = torch.zeros(len(enc), width, dtype=torch.long)  # [PAD] is 0
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for i, (a, t) in enumerate(enc):
            ids[i, : len(a)] = torch.tensor(a)
            types[i, : len(t)] = torch.tensor(t)
            mask[i, : len(a)] = 1
        return ids, types, mask

    @torch.no_grad()
    def predict_proba(self, recs: Sequence[RelevanceRecord], batch_size: int = 256) -> torch.Tensor:
        """Label probabilities, [len(recs), K]."""
        self.model.eval()
        out = []
        for i in range(0, len(recs), batch_size):
            ids, types, mask = self._batch(recs[i : i + batch_size])
            logits = self.model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
            out.append(torch.softmax(logits.double(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, len(self.labels), dtype=torch.float64)

    def evaluate(self, gold: Sequence[RelevanceRecord], k: int = 10) -> dict:
        """Accuracy, macro-F1, per-class F1 and mean NDCG@k (with the per-query values)
        against the gold labels of `gold`."""
        return score_predictions(gold, self.predict_proba(gold), self.labels, k)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        (out / "vocab.txt").write_text("\n".join(self.tokenizer.itos) + "\n")
        return out


def score_predictions(
    gold: Sequence[RelevanceRecord], proba: torch.Tensor, labels: LabelSet, k: int = 10
) -> dict:
    """Metrics of predicted distributions against gold records (argmax for the labels,
    expected gain for the ranking)."""
    g = [labels.lookup(r.label) if r.label else None for r in gold]
    if any(x is None for x in g):
        raise ValueError("every gold pair needs a label from the label set")
    pred = proba.argmax(dim=-1).tolist()
    gains = torch.tensor([labels.gain(i) for i in range(len(labels))], dtype=torch.float64)
    scores = (proba @ gains).tolist()
    out: dict = classification_metrics(g, pred, labels)  # type: ignore[arg-type]
    per_query = ndcg_per_query(
        [r.group for r in gold],
        [labels.gain(x) for x in g],
        scores,
        k=k,  # type: ignore[arg-type]
    )
    out[f"ndcg@{k}"] = sum(per_query.values()) / max(len(per_query), 1)
    # How much probability the student puts on the gold label (mean) and its log loss: they
    # follow the share of right labels it was trained on where argmax metrics saturate.
    p_gold = proba[torch.arange(len(g)), torch.tensor(g)]
    out["p_gold"] = float(p_gold.mean())
    out["nll"] = float(-p_gold.clamp_min(1e-12).log().mean())
    out["ndcg_per_query"] = per_query
    return out


def train_student(
    records: Sequence[RelevanceRecord],
    labels: LabelSet,
    config: StudentConfig | None = None,
    weights: Sequence[float] | None = None,
    log=None,
) -> Student:
    """Train a cross-encoder on labelled `records` (labels by name or code). `weights`: one
    per record (annotation confidences), used when `config.confidence_weighting`."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = config or StudentConfig()
    if not records:
        raise ValueError("no labelled pairs to train the student on")
    y = [labels.lookup(r.label) if r.label else None for r in records]
    if any(v is None for v in y):
        bad = next(r for r, v in zip(records, y, strict=True) if v is None)
        raise ValueError(f"pair {bad.id!r}: label {bad.label!r} is not in the label set")
    w = [1.0] * len(records)
    if cfg.confidence_weighting:
        if weights is None or len(weights) != len(records):
            raise ValueError("confidence_weighting needs one weight per training pair")
        w = [float(x) for x in weights]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        tok = PairTokenizer.build(
            [r.query for r in records] + [item_text(r, cfg.item_fields) for r in records],
            cfg.min_count,
        )
        bert = BertConfig(
            vocab_size=len(tok.itos),
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.ffn,
            max_position_embeddings=cfg.max_len,
            type_vocab_size=4,
            num_labels=len(labels),
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            classifier_dropout=cfg.dropout,
            pad_token_id=0,
        )
        if cfg.pooling == "cls":
            model = BertForSequenceClassification(bert)
        else:
            model = PairEncoder(bert, cfg.dropout)
        student = Student(model, tok, labels, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = random.Random(cfg.seed)
        order = list(range(len(records)))
        steps = cfg.epochs * math.ceil(len(order) / cfg.batch_size)
        step = 0
        for epoch in range(cfg.epochs):
            rng.shuffle(order)
            model.train()
            total = 0.0
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * (1 - 0.9 * step / steps)
                ids, types, mask = student._batch([records[i] for i in idx])
                logits = model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
                target = torch.tensor([y[i] for i in idx])
                wt = torch.tensor([w[i] for i in idx], dtype=logits.dtype)
                nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
                loss = (nll * wt).sum() / wt.sum().clamp_min(1e-12)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                step += 1
            if log is not None:
                log(f"student: epoch {epoch + 1}/{cfg.epochs} loss {total / len(order):.4f}")
        model.eval()
        return student
    finally:
        torch.set_num_threads(threads)


def student_config_dict(cfg: StudentConfig) -> dict:
    return asdict(cfg)
