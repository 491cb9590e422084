"""Deterministic batches over epochs, with a position that can be saved and restored.

Epoch e's order is a pure function of (seed, e, dataset size): the indices sorted by a hash of
(seed, e, index). It needs no RNG state, so a resumed run only stores (epoch, offset, seed).
A batch that runs past the end of an epoch continues at the start of the next epoch's order,
so every batch is full and no prompt is skipped or repeated within an epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Permutation of range(n) for `epoch`; identity when not shuffling."""
    if not shuffle:
        return list(range(n))

    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{epoch}:{i}".encode(), digest_size=8).digest()

    return sorted(range(n), key=key)


class PromptIterator(Generic[T]):
    """Infinite iterator of `batch_size`-long lists of items."""

    def __init__(
        self, items: Sequence[T], batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if not items:
            raise ValueError(
                "PromptIterator needs at least one item: the prompt set is empty (an empty "
                "file, or every prompt filtered out as too long for the engine)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        """Epoch of the next item."""
        self.offset = 0
        """Position of the next item in that epoch's order."""
        self._order = epoch_order(len(items), seed, 0, shuffle)

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = epoch_order(len(self.items), self.seed, epoch, self.shuffle)

    def next_batch(self) -> list[T]:
        batch: list[T] = []
        while len(batch) < self.batch_size:
            if self.offset == len(self._order):
                self._set_epoch(self.epoch + 1)
                self.offset = 0
            take = min(self.batch_size - len(batch), len(self._order) - self.offset)
            batch.extend(self.items[i] for i in self._order[self.offset : self.offset + take])
            self.offset += take
        return batch

    def __iter__(self) -> Iterator[list[T]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "num_items": len(self.items),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A different dataset size would silently give different prompts: refuse it.
        if state["num_items"] != len(self.items):
            raise ValueError(
                f"iterator state is for {state['num_items']} items, this dataset has "
                f"{len(self.items)}"
            )
        if not 0 <= state["offset"] <= len(self.items):
            raise ValueError(f"iterator state offset {state['offset']} out of range")
        self.seed = state["seed"]
        self.shuffle = state["shuffle"]
        self._set_epoch(state["epoch"])
        self.offset = state["offset"]
