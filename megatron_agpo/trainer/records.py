"""The typed record that crosses the trainer's stages: one step's scored rollouts.

rollout (engine samples) -> reward (scores) -> advantages -> filters -> token batch. Rank 0
fills it from the engine and the reward; `broadcast_scored` sends it to every rank as a few
flat tensors (no pickling between ranks, no per-row Python objects), and each rank builds the
token batch of its own rows from it with vectorised ops.

Shape legend: B samples (groups x group_size, group order), P / R total prompt / response
tokens (the rows' tokens concatenated in row order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[B + 1] start of each row in the flat tokens, and the end."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def flat_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[sum(lengths)] the integers starts[i] .. starts[i] + lengths[i] - 1, row after row."""
    offsets = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
    return offsets + torch.arange(offsets.numel(), device=offsets.device)


def _gather_rows(flat: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The flat tokens of `rows` (in that order), by one vectorised gather."""
    return flat[flat_ranges(_offsets(lengths)[:-1][rows], lengths[rows])]


@dataclass
class ScoredRollouts:
    """Samples of whole groups (a prompt's `group_size` samples are adjacent), their rewards
    and, once computed, advantages. Host-side (CPU) flat tensors: the batch builder moves
    what the model reads onto its device."""

    prompt_tokens: torch.Tensor
    """[P] int64 every sample's prompt tokens, concatenated."""
    prompt_lens: torch.Tensor
    """[B] int64."""
    response_tokens: torch.Tensor
    """[R] int64 every sample's response tokens, concatenated."""
    response_lens: torch.Tensor
    """[B] int64."""
    rollout_logp: torch.Tensor
    """[R] float32 the engine's log-prob of each response token."""
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
    token_versions: torch.Tensor | None = None
    """[R] int64 the weight version that sampled each response token (overlapped generation;
    rank 0 only: the staleness filter and metrics read it there, before the broadcast, which
    does not carry it). None: every token is `weight_version`'s."""
    routes: torch.Tensor | None = None
    """[P + R, L, K] int64, router replay (`model.router_replay=rollout`): the K experts the
    engine sent each token of each row (its prompt, then its response, row after row) to in
    each of the L MoE layers; a row's last token, which the engine never ran, has experts
    0..K-1. Broadcast with the rest. None: no replay."""

    def sample_versions(self) -> torch.Tensor:
        """[B] int64 each sample's oldest token version (`weight_version` without versions)."""
        if self.token_versions is None:
            return torch.full((len(self),), self.weight_version, dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(len(self)), self.response_lens)
        out = torch.full((len(self),), torch.iinfo(torch.int64).max, dtype=torch.int64)
        out = out.scatter_reduce(0, rows, self.token_versions, reduce="amin")
        # An empty response has no token: its sample's version is the batch's oldest.
        return torch.where(self.response_lens > 0, out, torch.full_like(out, self.weight_version))

    def __len__(self) -> int:
        return self.response_lens.shape[0]

    @property
    def num_groups(self) -> int:
        return len(self) // self.group_size

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_lens.to(torch.float64)

    @staticmethod
    def from_lists(
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float]],
        truncated: Sequence[bool],
        rewards: Sequence[float],
        weight_version: int,
        group_size: int,
    ) -> ScoredRollouts:
        """From the engine's per-sample lists (rank 0, once per batch). Raises naming the
        sample whose log-probs and tokens disagree."""
        for i, (r, lp) in enumerate(zip(responses, logprobs, strict=True)):
            if len(r) != len(lp):
                raise ValueError(f"sample {i}: {len(lp)} log-probs for {len(r)} response tokens")
        cpu = torch.device("cpu")
        flat = lambda seqs, dt: torch.tensor([x for s in seqs for x in s], dtype=dt, device=cpu)  # noqa: E731
        lens = lambda seqs: torch.tensor([len(s) for s in seqs], dtype=torch.int64, device=cpu)  # noqa: E731
        return ScoredRollouts(
            prompt_tokens=flat(prompts, torch.int64),
            prompt_lens=lens(prompts),
            response_tokens=flat(responses, torch.int64),
            response_lens=lens(responses),
            rollout_logp=flat(logprobs, torch.float32),
            truncated=torch.tensor(list(truncated), dtype=torch.bool, device=cpu),
            rewards=torch.tensor(list(rewards), dtype=torch.float64, device=cpu),
            weight_version=weight_version,
            group_size=group_size,
        )

    def select(self, rows: torch.Tensor) -> ScoredRollouts:
        """The samples at `rows` (whole groups, in order): vectorised gathers (none when
        `rows` is every sample in order, as with one data-parallel rank)."""
        if rows.numel() == len(self) and torch.equal(
            rows, torch.arange(len(self), device=rows.device)
        ):
            return self
        return ScoredRollouts(
            prompt_tokens=_gather_rows(self.prompt_tokens, self.prompt_lens, rows),
            prompt_lens=self.prompt_lens[rows],
            response_tokens=_gather_rows(self.response_tokens, self.response_lens, rows),
            response_lens=self.response_lens[rows],
            rollout_logp=_gather_rows(self.rollout_logp, self.response_lens, rows),
            truncated=self.truncated[rows],
            rewards=self.rewards[rows],
            weight_version=self.weight_version,
            group_size=self.group_size,
            advantages=None if self.advantages is None else self.advantages[rows],
            token_versions=None
            if self.token_versions is None
            else _gather_rows(self.token_versions, self.response_lens, rows),
            routes=None
            if self.routes is None
            else _gather_rows(self.routes, self.prompt_lens + self.response_lens, rows),
        )

    def set_routes(self, per_sample: Sequence) -> None:
        """`routes` from each sample's engine routes ([its tokens - 1, L, K], in row order;
        `Sample.routed_experts`). Raises naming the sample whose routes do not fit."""
        lens = (self.prompt_lens + self.response_lens).tolist()
        first = torch.as_tensor(per_sample[0], dtype=torch.int64)
        n_layers, k = first.shape[1:]
        pad = torch.arange(k, dtype=torch.int64).expand(1, n_layers, k)
        out = []
        for i, (r, n) in enumerate(zip(per_sample, lens, strict=True)):
            r = torch.as_tensor(r, dtype=torch.int64) if r is not None else None
            if r is None or r.shape != (n - 1, n_layers, k):
                got = None if r is None else tuple(r.shape)
                raise ValueError(f"sample {i}: engine routes {got} for {n} tokens (want "
                                 f"[{n - 1}, {n_layers}, {k}])")  # fmt: skip
            out += [r, pad]
        self.routes = torch.cat(out)

    @staticmethod
    def concat(parts: Sequence[ScoredRollouts]) -> ScoredRollouts:
        """Several rounds' kept groups as one record (advantages are per group, so
        concatenating changes none of them)."""
        first = parts[0]
        has_adv = all(p.advantages is not None for p in parts)
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return ScoredRollouts(
            prompt_tokens=cat("prompt_tokens"),
            prompt_lens=cat("prompt_lens"),
            response_tokens=cat("response_tokens"),
            response_lens=cat("response_lens"),
            rollout_logp=cat("rollout_logp"),
            truncated=cat("truncated"),
            rewards=cat("rewards"),
            weight_version=first.weight_version,
            group_size=first.group_size,
            advantages=cat("advantages") if has_adv else None,
            token_versions=(
                torch.cat(
                    [
                        p.token_versions
                        if p.token_versions is not None
                        else torch.full_like(p.response_tokens, p.weight_version)
                        for p in parts
                    ]
                )
                if any(p.token_versions is not None for p in parts)
                else None
            ),  # fmt: skip
            routes=cat("routes") if all(p.routes is not None for p in parts) else None,
        )


class RolloutFailed(RuntimeError):
    """The rollout engine failed on rank 0 (a replica died, its heartbeat stopped, the pool is
    unusable): raised on every rank, with rank 0's one-line message, by the broadcast that
    would have carried the step's (or the evaluation's) samples, so every rank stops at the
    same point and a collective emergency save is possible (`Trainer.run`)."""

    EXIT_CODE = 69
    """EX_UNAVAILABLE: the run's exit status after a rollout failure (docs/ROLLOUT.md)."""


def broadcast_scored(
    scored: ScoredRollouts | None,
    device: torch.device,
    src: int = 0,
    failure: str | None = None,
) -> ScoredRollouts:
    """rank src's record on every rank, as tensors over the default group.

    On NCCL every tensor must live on the GPU, hence `device` (the model's); gloo takes CPU
    tensors. Two rounds: a header with the sizes, then one int64 and one float64 payload, so
    receivers allocate exactly; the result is on the CPU (host-side bookkeeping).

    `failure` (rank src): the engine failed and there is no record; the header's flag says
    so, the message's bytes follow, and every rank (src included) raises `RolloutFailed`
    with it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if failure is not None:
            raise RolloutFailed(failure)
        assert scored is not None
        return scored
    me = dist.get_rank()
    if me == src:
        if failure is not None:
            header = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int64, device=device)
        else:
            assert scored is not None
            layers, k = scored.routes.shape[1:] if scored.routes is not None else (0, 0)
            header = torch.tensor(
                [0, len(scored), scored.prompt_tokens.numel(), scored.response_tokens.numel(),
                 scored.group_size, scored.weight_version, layers, k],
                dtype=torch.int64, device=device,
            )  # fmt: skip
    else:
        header = torch.zeros(8, dtype=torch.int64, device=device)
    dist.broadcast(header, src)
    failed, b, n_prompt, n_resp, group_size, version, layers, k = header.tolist()
    if failed:
        from megatron_agpo.parallel import broadcast_bytes

        data = (failure or "").encode() if me == src else None
        message = broadcast_bytes(data, src, device=device).decode(errors="replace")
        raise RolloutFailed(message)
    n_int = 2 * b + n_prompt + n_resp
    if me == src:
        ints = torch.cat(
            [scored.prompt_lens, scored.response_lens, scored.prompt_tokens,
             scored.response_tokens]
        ).to(device)  # fmt: skip
        floats = torch.cat(
            [scored.rewards.to(torch.float64), scored.truncated.to(torch.float64),
             scored.rollout_logp.to(torch.float64)]
        ).to(device)  # fmt: skip
    else:
        ints = torch.empty(n_int, dtype=torch.int64, device=device)
        floats = torch.empty(2 * b + n_resp, dtype=torch.float64, device=device)
    dist.broadcast(ints, src)
    dist.broadcast(floats, src)
    routes = None
    if layers:  # router replay: every token's experts
        shape = (n_prompt + n_resp, layers, k)
        routes = (
            scored.routes.to(device)
            if me == src
            else torch.empty(shape, dtype=torch.int64, device=device)
        )
        dist.broadcast(routes, src)
    if me == src:
        return scored
    ints, floats = ints.cpu(), floats.cpu()
    return ScoredRollouts(
        routes=None if routes is None else routes.cpu(),
        prompt_lens=ints[:b],
        response_lens=ints[b : 2 * b],
        prompt_tokens=ints[2 * b : 2 * b + n_prompt],
        response_tokens=ints[2 * b + n_prompt :],
        rollout_logp=floats[2 * b :].to(torch.float32),
        truncated=floats[b : 2 * b].bool(),
        rewards=floats[:b],
        weight_version=version,
        group_size=group_size,
    )
