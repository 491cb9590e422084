"""The typed record that crosses the trainer's stages: one step's scored rollouts.

rollout (engine samples) -> reward (scores) -> advantages -> filters -> token batch. Rank 0
fills it from the engine and the reward; `broadcast_scored` sends it to every rank as plain
tensors (no pickling between ranks), so all ranks build identical batches.

Shape legend: B samples (groups x group_size, group order), L total response/prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ScoredRollouts:
    """Samples of whole groups (a prompt's `group_size` samples are adjacent), their rewards
    and, once computed, advantages. Host-side (CPU) tensors: the batch builder moves what the
    model reads onto its device."""

    prompt_ids: list[tuple[int, ...]]
    """[B] prompt token ids of each sample."""
    response_ids: list[tuple[int, ...]]
    """[B] sampled response token ids."""
    rollout_logp: list[tuple[float, ...]]
    """[B] the engine's log-prob of each response token."""
    truncated: torch.Tensor
    """[B] bool: the response hit the token limit."""
    rewards: torch.Tensor
    """[B] float64 reward of each sample."""
    weight_version: int
    """Weights the engine sampled with."""
    group_size: int
    """Samples per prompt (G)."""
    advantages: torch.Tensor | None = None
    """[B] float64, set by the advantages stage."""

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_groups(self) -> int:
        return len(self) // self.group_size

    @property
    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.float64, device="cpu")

    def select(self, rows: torch.Tensor) -> ScoredRollouts:
        """The samples at `rows` (whole groups, in order)."""
        idx = rows.tolist()
        return ScoredRollouts(
            prompt_ids=[self.prompt_ids[i] for i in idx],
            response_ids=[self.response_ids[i] for i in idx],
            rollout_logp=[self.rollout_logp[i] for i in idx],
            truncated=self.truncated[rows],
            rewards=self.rewards[rows],
            weight_version=self.weight_version,
            group_size=self.group_size,
            advantages=None if self.advantages is None else self.advantages[rows],
        )

    @staticmethod
    def concat(parts: Sequence[ScoredRollouts]) -> ScoredRollouts:
        """Several rounds' kept groups as one record (advantages are per group, so
        concatenating changes none of them)."""
        first = parts[0]
        has_adv = all(p.advantages is not None for p in parts)
        return ScoredRollouts(
            prompt_ids=[x for p in parts for x in p.prompt_ids],
            response_ids=[x for p in parts for x in p.response_ids],
            rollout_logp=[x for p in parts for x in p.rollout_logp],
            truncated=torch.cat([p.truncated for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]),
            weight_version=first.weight_version,
            group_size=first.group_size,
            advantages=torch.cat([p.advantages for p in parts]) if has_adv else None,
        )


def _flat(seqs: Sequence[Sequence], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([x for s in seqs for x in s], dtype=dtype, device="cpu")


def _split(flat: torch.Tensor, lengths: list[int]) -> list[tuple]:
    out, at = [], 0
    for n in lengths:
        out.append(tuple(flat[at : at + n].tolist()))
        at += n
    return out


def broadcast_scored(
    scored: ScoredRollouts | None, device: torch.device, src: int = 0
) -> ScoredRollouts:
    """rank src's record on every rank, as tensors over the default group.

    On NCCL every tensor must live on the GPU, hence `device` (the model's); gloo takes CPU
    tensors. Two rounds: the sizes, then the payload, so receivers allocate exactly."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        assert scored is not None
        return scored
    me = dist.get_rank()
    if me == src:
        assert scored is not None
        p_len = [len(p) for p in scored.prompt_ids]
        r_len = [len(r) for r in scored.response_ids]
        header = torch.tensor(
            [len(scored), sum(p_len), sum(r_len), scored.group_size, scored.weight_version],
            dtype=torch.int64,
            device=device,
        )
    else:
        header = torch.zeros(5, dtype=torch.int64, device=device)
    dist.broadcast(header, src)
    b, n_prompt, n_resp, group_size, version = header.tolist()
    if me == src:
        lengths = torch.tensor([p_len, r_len], dtype=torch.int64, device=device)
        prompts = _flat(scored.prompt_ids, torch.int64).to(device)
        responses = _flat(scored.response_ids, torch.int64).to(device)
        logp = _flat(scored.rollout_logp, torch.float32).to(device)
        per_sample = torch.stack(
            [scored.rewards.to(torch.float64), scored.truncated.to(torch.float64)]
        ).to(device)
    else:
        lengths = torch.zeros(2, b, dtype=torch.int64, device=device)
        prompts = torch.zeros(n_prompt, dtype=torch.int64, device=device)
        responses = torch.zeros(n_resp, dtype=torch.int64, device=device)
        logp = torch.zeros(n_resp, dtype=torch.float32, device=device)
        per_sample = torch.zeros(2, b, dtype=torch.float64, device=device)
    for t in (lengths, prompts, responses, logp, per_sample):
        dist.broadcast(t, src)
    if me == src:
        return scored
    p_len, r_len = lengths.cpu().tolist()
    per_sample = per_sample.cpu()
    return ScoredRollouts(
        prompt_ids=_split(prompts.cpu(), p_len),
        response_ids=_split(responses.cpu(), r_len),
        rollout_logp=_split(logp.cpu(), r_len),
        truncated=per_sample[1].bool(),
        rewards=per_sample[0],
        weight_version=version,
        group_size=group_size,
    )
