"""From rollout samples to the tensors one training step consumes.

Shape legend: B sequences (prompts x n), S padded length of prompt + response.

A sequence is prompt + response; the model reads all of it, and the loss covers the positions
whose *next* token is a response token: `target[b, t] = seq[b, t + 1]` for
`t in [len(prompt) - 1, len(seq) - 2]`, IGNORE_INDEX elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from megatron_agpo.ops import IGNORE_INDEX


@dataclass
class TokenBatch:
    """Sequences ready for the policy, with everything the loss needs per token."""

    input_ids: torch.Tensor
    """[B, S] prompt + response, right-padded with the pad id."""
    target: torch.Tensor
    """[B, S] next token where it is a response token, IGNORE_INDEX elsewhere."""
    loss_mask: torch.Tensor
    """[B, S] float, 1 where target is a response token."""
    advantages: torch.Tensor
    """[B] one advantage per sequence."""
    rollout_logp: torch.Tensor
    """[B, S] the engine's log-prob of each target token (0 elsewhere)."""
    seq_lens: torch.Tensor | None = None
    """[B] prompt + response length of each row (the rest is padding)."""
    old_logp: torch.Tensor | None = None
    """[B, S] the trainer's log-probs before the update (recompute mode), else None."""
    ref_logp: torch.Tensor | None = None
    """[B, S] the reference policy's log-probs (only when the KL term is on)."""
    agg_weights: torch.Tensor | None = None
    """[B, S] w with loss = sum(w * L_t) over the whole mini-batch (set per mini-batch)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | slice) -> TokenBatch:
        """Rows idx of every per-sequence tensor."""
        return TokenBatch(
            **{
                f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                for f in fields(self)
            }
        )

    def to(self, device: torch.device | str) -> TokenBatch:
        """Every tensor on `device` (the model's: the step creates nothing elsewhere)."""
        return TokenBatch(
            **{
                f.name: (
                    None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                )
                for f in fields(self)
            }
        )

    def trimmed(self, multiple: int = 1) -> TokenBatch:
        """The same rows without the padding columns no row needs; the length is rounded up to
        a multiple of `multiple` (sequence parallelism splits it over the TP ranks)."""
        if self.seq_lens is None:
            return self
        s = -(-int(self.seq_lens.max()) // multiple) * multiple
        if s > self.input_ids.shape[1]:
            raise ValueError(
                f"batch length {self.input_ids.shape[1]} is not a multiple of {multiple}: build "
                "it with build_token_batch(..., pad_multiple=...)"
            )
        return TokenBatch(
            **{
                f.name: (t[:, :s] if t is not None and t.dim() == 2 else t)
                for f in fields(self)
                for t in [getattr(self, f.name)]
            }
        )

    def micro_batches(
        self, max_rows: int, token_budget: int = 0, multiple: int = 1
    ) -> list[MicroBatch]:
        """Split for forward/backward: at most max_rows sequences per micro-batch and, with a
        token budget, at most token_budget padded tokens (rows x longest row); each trimmed
        to its longest row, rounded up to `multiple`."""
        if self.seq_lens is None or token_budget <= 0:
            plan = [
                list(range(s, min(s + max_rows, len(self)))) for s in range(0, len(self), max_rows)
            ]
        else:
            plan = plan_micro_batches(self.seq_lens.tolist(), max_rows, token_budget)
        device = self.input_ids.device
        return [
            MicroBatch(self.select(torch.tensor(rows, device=device)).trimmed(multiple), rows)
            for rows in plan
        ]

    @property
    def advantages_per_token(self) -> torch.Tensor:
        return self.advantages[:, None].expand_as(self.loss_mask)


@dataclass
class MicroBatch:
    """A micro-batch and the rows of the parent batch it holds (in its order)."""

    batch: TokenBatch
    rows: list[int]


def plan_micro_batches(lengths: Sequence[int], max_rows: int, token_budget: int) -> list[list[int]]:
    """Dynamic batch size: group row indices so that each group's padded size
    (len(group) x its longest row) stays within token_budget and len(group) <= max_rows.

    Rows are taken longest first, so rows of similar length share a micro-batch and little of
    it is padding. A row longer than the budget gets a micro-batch of its own (it cannot be
    split without changing the sequence); nothing is dropped or cut.
    """
    if max_rows < 1 or token_budget < 1:
        raise ValueError(f"max_rows={max_rows} and token_budget={token_budget} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    for i in order:
        # Longest first: the group's first row is its longest, so its cost is rows x that.
        if (
            plan
            and len(plan[-1]) < max_rows
            and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= token_budget
        ):
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def build_token_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    rollout_logprobs: Sequence[Sequence[float]],
    advantages: torch.Tensor,
    pad_id: int,
    pad_multiple: int = 1,
) -> TokenBatch:
    """Pack B (prompt, response) pairs, on the CPU (move the result with `.to(device)`); the
    padded length is a multiple of `pad_multiple`. Raises naming the row when lengths
    disagree."""
    b = len(prompts)
    if not (len(responses) == len(rollout_logprobs) == b == advantages.shape[0]):
        raise ValueError(
            f"{b} prompts, {len(responses)} responses, {len(rollout_logprobs)} log-prob lists "
            f"and {advantages.shape[0]} advantages: one of each per sequence"
        )
    for i, (p, r, lp) in enumerate(zip(prompts, responses, rollout_logprobs, strict=True)):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt")
        if len(lp) != len(r):
            raise ValueError(f"sequence {i}: {len(lp)} rollout log-probs for {len(r)} tokens")
    s = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    s = -(-s // pad_multiple) * pad_multiple
    input_ids = torch.full((b, s), pad_id, dtype=torch.long, device="cpu")
    target = torch.full((b, s), IGNORE_INDEX, dtype=torch.long, device="cpu")
    rollout = torch.zeros(b, s, device="cpu")
    for i, (p, r, lp) in enumerate(zip(prompts, responses, rollout_logprobs, strict=True)):
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, device="cpu")
        if r:
            first = len(p) - 1  # position whose next token is the first response token
            target[i, first : first + len(r)] = torch.tensor(list(r), device="cpu")
            rollout[i, first : first + len(r)] = torch.tensor(
                list(lp), dtype=torch.float32, device="cpu"
            )
    return TokenBatch(
        input_ids=input_ids,
        target=target,
        loss_mask=(target != IGNORE_INDEX).float(),
        advantages=advantages.to(device="cpu", dtype=torch.float32),
        rollout_logp=rollout,
        seq_lens=torch.tensor(
            [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], device="cpu"
        ),
    )
