"""From scored rollouts to the tensors one training step consumes, and from those to the
micro-batches the model reads.

Shape legend: B sequences (rows), S padded length of prompt + response, N response tokens
(loss positions), T length of a micro-batch's (packed) rows, b rows of a micro-batch.

A sequence is prompt + response; the model reads all of it, and the loss covers the positions
whose *next* token is a response token: `target[b, t] = seq[b, t + 1]` for
`t in [len(prompt) - 1, len(seq) - 2]`, IGNORE_INDEX elsewhere.

Two layouts, one contract. `TokenBatch` holds a rank's rows padded to [B, S]: cheap (no
vocabulary dimension) and convenient for the RL math. The model reads `MicroBatch`es: with
packing (the default) whole sequences are concatenated into one row with a block-diagonal
causal attention mask (no token attends across sequences), so padding costs nothing; in
either layout only the N loss positions reach the output layer and the loss, as flat [N]
vectors. Every row plan and index is computed on the host from the lengths the host already
knows (`RowLengths`), so building micro-batches never waits on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_agpo.ops import IGNORE_INDEX
from megatron_agpo.trainer.records import flat_ranges


@dataclass(frozen=True)
class RowLengths:
    """Host-side lengths of a batch's rows (Python ints: planning never touches the device)."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    loss: tuple[int, ...]
    """Response tokens each row contributes to the loss (0 for a row the overlong filter
    removed, else its response length)."""

    @property
    def seq(self) -> tuple[int, ...]:
        return tuple(p + r for p, r in zip(self.prompt, self.response, strict=True))

    def select(self, rows: Sequence[int]) -> RowLengths:
        return RowLengths(
            tuple(self.prompt[i] for i in rows),
            tuple(self.response[i] for i in rows),
            tuple(self.loss[i] for i in rows),
        )

    def without_loss(self, rows_removed: Sequence[bool]) -> RowLengths:
        """The same rows, those flagged contributing no loss token."""
        return RowLengths(
            self.prompt,
            self.response,
            tuple(0 if cut else n for n, cut in zip(self.loss, rows_removed, strict=True)),
        )


_PER_ROW = ("input_ids", "target", "loss_mask", "advantages", "rollout_logp", "old_logp",
            "ref_logp", "agg_weights", "routes")  # fmt: skip


@dataclass
class TokenBatch:
    """A rank's sequences, padded, with everything the loss needs per token."""

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
    lengths: RowLengths
    """Host-side lengths of every row (the micro-batch plans are made from these)."""
    old_logp: torch.Tensor | None = None
    """[B, S] the trainer's log-probs before the update (recompute mode), else None."""
    ref_logp: torch.Tensor | None = None
    """[B, S] the reference policy's log-probs (only when the KL term is on)."""
    agg_weights: torch.Tensor | None = None
    """[B, S] w with loss = sum(w * L_t) over the whole (global) mini-batch."""
    routes: torch.Tensor | None = None
    """[B, S, L, K] int64, mixture-of-experts models with `model.router_replay=rollout`: the
    K experts the engine sent each token to in each of the L MoE layers (positions it never
    ran, the last token and padding: experts 0..K-1, which reach no used logit); the
    forwards replay them (`megatron_agpo.models.moe`). None: the trainer's router chooses."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Sequence[int]) -> TokenBatch:
        """Rows `rows` (host ints) of every per-sequence tensor."""
        idx = torch.tensor(list(rows), dtype=torch.long, device="cpu").to(self.input_ids.device)
        kw = {k: (None if getattr(self, k) is None else getattr(self, k)[idx]) for k in _PER_ROW}
        return TokenBatch(lengths=self.lengths.select(rows), **kw)

    def to(self, device: torch.device | str) -> TokenBatch:
        """Every tensor on `device` (the model's: the step creates nothing elsewhere)."""
        kw = {
            k: (None if getattr(self, k) is None else getattr(self, k).to(device)) for k in _PER_ROW
        }
        return TokenBatch(lengths=self.lengths, **kw)

    def without_loss(self, rows: Sequence[bool]) -> TokenBatch:
        """The same batch with the flagged rows out of the loss (DAPO's overlong filter):
        targets ignored, mask 0 and no loss positions, kept consistent together."""
        import dataclasses

        cut = torch.tensor([bool(x) for x in rows], dtype=torch.bool, device="cpu")
        cut = cut.to(self.target.device)[:, None]
        return dataclasses.replace(
            self,
            target=self.target.masked_fill(cut, IGNORE_INDEX),
            loss_mask=self.loss_mask.masked_fill(cut, 0.0),
            lengths=self.lengths.without_loss(rows),
        )

    @property
    def advantages_per_token(self) -> torch.Tensor:
        return self.advantages[:, None].expand_as(self.loss_mask)

    def micro_batches(
        self, max_rows: int, token_budget: int = 0, multiple: int = 1, packing: bool = True
    ) -> list[MicroBatch]:
        """Split for forward/backward. Without a token budget, `max_rows` sequences per
        micro-batch, in row order; with one, at most `token_budget` tokens each (packed: the
        sequences' tokens; padded: rows x longest row), longest first so that rows of similar
        length share a micro-batch. A sequence longer than the budget gets one of its own
        (it is never cut). Row lengths are rounded up to `multiple` (sequence parallelism
        splits them over the TP ranks)."""
        seq = self.lengths.seq
        plan = plan_micro_batches(seq, max_rows, token_budget, packed=packing)
        return [MicroBatch.build(self, rows, multiple, packing) for rows in plan]


@dataclass
class MicroBatch:
    """What one forward/backward reads: model input rows, and the loss's tokens as flat [N]
    vectors (prompt and padding positions are not among them)."""

    input_ids: torch.Tensor
    """[b, T] token ids: b packed rows (packing) or b padded sequences."""
    attention_mask: torch.Tensor | None
    """[b, 1, T, T] bool, True = masked (megatron's convention): block-diagonal causal over
    the packed sequences; None for padded rows (the model's own causal mask)."""
    cu_seqlens: torch.Tensor | None
    """[n + 1] int32 sequence boundaries in the packed row (Transformer Engine's THD layout),
    the row's trailing padding as one more segment; None for padded rows."""
    positions: torch.Tensor
    """[N] index of each loss position in the model output flattened as [T * b] (sequence
    first, megatron's [T, b, H] layout): t * b + row."""
    target: torch.Tensor
    """[N] the response token predicted at each position."""
    advantages: torch.Tensor
    """[N] the advantage of the token's sequence."""
    rollout_logp: torch.Tensor
    """[N] the engine's log-prob."""
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    agg_weights: torch.Tensor | None
    """[N] aggregation weights (global normalisation)."""
    seq_index: torch.Tensor
    """[N] which of the micro-batch's sequences (0..n-1) the token belongs to (GSPO)."""
    rows: list[int]
    """The parent batch's rows this micro-batch holds, in order."""
    max_seqlen: int
    """The longest sequence (host int, for Transformer Engine's THD attention)."""
    source: torch.Tensor
    """[N] index of each token in the parent's [B, S] flattened (row * S + col): where its
    log-prob goes back."""
    routes: torch.Tensor | None = None
    """[L, T * b, K] the engine's experts for every model position in megatron's order
    (t * b + row; padding: experts 0..K-1), replayed by the forward; None: no replay."""

    @property
    def num_tokens(self) -> int:
        """Positions the model runs (rows x length)."""
        return self.input_ids.numel()

    @staticmethod
    def build(parent: TokenBatch, rows: list[int], multiple: int, packed: bool) -> MicroBatch:
        """Vectorised gathers from the parent's [B, S] tensors; every index is made on the
        host from `parent.lengths` and moved once."""
        dev, s_parent = parent.input_ids.device, parent.input_ids.shape[1]
        lens = parent.lengths.select(rows)
        seq, prompt, loss = lens.seq, lens.prompt, lens.loss
        rows_t = torch.tensor(rows, dtype=torch.long, device="cpu")
        seq_t = torch.tensor(seq, dtype=torch.long, device="cpu")
        n_seq = len(rows)
        if packed:
            b, t_len = 1, _round_up(sum(seq), multiple)
            starts = torch.cumsum(seq_t, 0) - seq_t  # where each sequence starts in the row
        else:
            b, t_len = n_seq, _round_up(max(seq), multiple)
            starts = torch.zeros(n_seq, dtype=torch.long, device="cpu")
        # Every real token: (its sequence, its column in the sequence).
        tok_seq = torch.repeat_interleave(torch.arange(n_seq, device="cpu"), seq_t)
        tok_col = torch.arange(int(sum(seq)), device="cpu") - torch.repeat_interleave(
            torch.cumsum(seq_t, 0) - seq_t, seq_t
        )
        # Loss positions: column prompt-1 .. prompt+loss-2 of each sequence.
        loss_t = torch.tensor(loss, dtype=torch.long, device="cpu")
        n_loss = int(sum(loss))
        pos_seq = torch.repeat_interleave(torch.arange(n_seq, device="cpu"), loss_t)
        pos_col = (
            torch.arange(n_loss, device="cpu")
            - torch.repeat_interleave(torch.cumsum(loss_t, 0) - loss_t, loss_t)
            + torch.tensor(prompt, dtype=torch.long, device="cpu")[pos_seq]
            - 1
        )
        if packed:
            out_row, out_t = torch.zeros_like(pos_seq), starts[pos_seq] + pos_col
            in_row, in_t = torch.zeros_like(tok_seq), starts[tok_seq] + tok_col
        else:
            out_row, out_t, in_row, in_t = pos_seq, pos_col, tok_seq, tok_col
        # One transfer of all indices to the model's device.
        src_tok = rows_t[tok_seq] * s_parent + tok_col
        dst_tok = in_row * t_len + in_t
        src_pos = rows_t[pos_seq] * s_parent + pos_col
        idx = torch.cat([src_tok, dst_tok, src_pos, out_t * b + out_row, pos_seq]).to(dev)
        n_tok = src_tok.numel()
        src_tok, dst_tok = idx[:n_tok], idx[n_tok : 2 * n_tok]
        src_pos = idx[2 * n_tok : 2 * n_tok + n_loss]
        positions, seq_index = idx[2 * n_tok + n_loss : 2 * n_tok + 2 * n_loss], idx[-n_loss:]
        if not n_loss:
            seq_index = idx[:0]
        pad_id = 0  # any id: padding positions are never read by a loss position
        input_ids = torch.full((b * t_len,), pad_id, dtype=torch.long, device=dev)
        input_ids[dst_tok] = parent.input_ids.reshape(-1)[src_tok]
        flat = lambda t: None if t is None else t.reshape(-1)[src_pos]  # noqa: E731
        mask = cu = None
        if packed:
            mask = packed_causal_mask(seq, t_len, dev)
            # The row's padding (rounding T up) is one more segment, as in the mask: THD
            # attention then covers exactly the row's T tokens.
            pad = t_len - int(sum(seq))
            ends = torch.cumsum(torch.tensor([*seq, pad] if pad else list(seq), device="cpu"), 0)
            zero = torch.zeros(1, dtype=torch.long, device="cpu")
            cu = torch.cat([zero, ends]).to(device=dev, dtype=torch.int32)
        routes = None
        if parent.routes is not None:  # router replay: the same gather, [b, T] -> [L, T*b, K]
            n_layers, k = parent.routes.shape[2:]
            r = torch.arange(k, device=dev).expand(b * t_len, n_layers, k).clone()
            r[dst_tok] = parent.routes.reshape(-1, n_layers, k)[src_tok]
            routes = r.view(b, t_len, n_layers, k).transpose(0, 1).reshape(-1, n_layers, k)
            routes = routes.permute(1, 0, 2).contiguous()
        return MicroBatch(
            input_ids=input_ids.view(b, t_len),
            attention_mask=mask,
            cu_seqlens=cu,
            positions=positions,
            target=flat(parent.target),
            advantages=parent.advantages[rows_t.to(dev)][seq_index],
            rollout_logp=flat(parent.rollout_logp),
            old_logp=flat(parent.old_logp),
            ref_logp=flat(parent.ref_logp),
            agg_weights=flat(parent.agg_weights),
            seq_index=seq_index,
            rows=rows,
            max_seqlen=max(max(seq), b * t_len - int(sum(seq)) if packed else 0),
            source=src_pos,
            routes=routes,
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def packed_causal_mask(seq_lens: Sequence[int], length: int, device) -> torch.Tensor:
    """[1, 1, T, T] bool, True = masked: each token sees the earlier tokens of its own
    sequence only. Padding after the last sequence forms one more block (its outputs are
    never read; a block keeps every softmax row non-empty)."""
    ids = torch.repeat_interleave(
        torch.arange(len(seq_lens) + 1, device="cpu"),
        torch.tensor([*seq_lens, length - sum(seq_lens)], dtype=torch.long, device="cpu"),
    ).to(device)
    same = ids[:, None] == ids[None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return ~(same & causal)[None, None]


def plan_micro_batches(
    lengths: Sequence[int], max_rows: int, token_budget: int, packed: bool = False
) -> list[list[int]]:
    """Group row indices into micro-batches. Without a token budget (<= 0): `max_rows`
    consecutive rows each. With one: at most `max_rows` rows and `token_budget` tokens each,
    counted as the sum of lengths (packed) or rows x the longest (padded); rows are taken
    longest first (first-fit decreasing when packed, so the bins fill up), and a row longer
    than the budget gets a micro-batch of its own (nothing is dropped or cut)."""
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows} must be >= 1")
    n = len(lengths)
    if token_budget <= 0:
        return [list(range(s, min(s + max_rows, n))) for s in range(0, n, max_rows)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    if packed:
        used: list[int] = []
        for i in order:
            for k, group in enumerate(plan):
                if len(group) < max_rows and used[k] + lengths[i] <= token_budget:
                    group.append(i)
                    used[k] += lengths[i]
                    break
            else:
                plan.append([i])
                used.append(lengths[i])
        return plan
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


def balanced_partition(weights: Sequence[int], parts: int) -> list[list[int]]:
    """Split item indices into `parts` groups of near-equal total weight (the
    Karmarkar-Karp largest-differencing method, as verl's `get_seqlen_balanced_partitions`),
    each group sorted. Groups differ in size by at most what the weights force; with fewer
    items than parts some groups are empty."""
    import heapq

    if parts < 1:
        raise ValueError(f"parts={parts} must be >= 1")
    # Each heap entry: a partial solution of `parts` groups, sorted by total; the key is the
    # spread (largest - smallest total), largest first.
    heap = []
    for i, w in enumerate(weights):
        groups = [(0, [])] * (parts - 1) + [(w, [i])]
        heapq.heappush(heap, (-w, i, groups))
    if not heap:
        return [[] for _ in range(parts)]
    counter = len(weights)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # Pair a's largest with b's smallest, and so on.
        merged = [(ta + tb, ia + ib) for (ta, ia), (tb, ib) in zip(a, reversed(b), strict=True)]
        merged.sort(key=lambda g: g[0])
        counter += 1
        heapq.heappush(heap, (-(merged[-1][0] - merged[0][0]), counter, merged))
    return [sorted(g) for _, g in heap[0][2]]


def row_scales(loss_lens: Sequence[int], mode: str, norm_constant: float | None) -> torch.Tensor:
    """[B] the aggregation weight of each row's loss tokens over a whole mini-batch whose
    rows have `loss_lens` loss tokens: `aggregation_weights` (every mode is a per-row
    constant times the mask) read off a [B, max len] mask, so a rank holding some of the rows
    weighs them exactly as the whole mini-batch would (B and N are the mini-batch's)."""
    from megatron_agpo.algorithms import aggregation_weights

    lens = torch.tensor(list(loss_lens), dtype=torch.long, device="cpu")
    width = max([1, *loss_lens])
    mask = (torch.arange(width, device="cpu")[None, :] < lens[:, None]).float()
    return aggregation_weights(mask, mode, norm_constant)[:, 0]


def build_token_batch(
    prompt_tokens: torch.Tensor,
    prompt_lens: Sequence[int],
    response_tokens: torch.Tensor,
    response_lens: Sequence[int],
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    pad_id: int,
    pad_multiple: int = 1,
    truncated: Sequence[bool] | None = None,
    routes: torch.Tensor | None = None,
) -> TokenBatch:
    """Pad B sequences given flat (concatenated) prompt and response tokens and their
    lengths, with vectorised scatters on the CPU (move the result with `.to(device)`); the
    padded length is a multiple of `pad_multiple`. `truncated` rows (DAPO's overlong filter)
    keep their tokens but leave the loss. `routes` ([P + R, L, K], each row's prompt then
    response, `ScoredRollouts.routes`): the engine's experts, placed as the tokens are (other
    positions: experts 0..K-1). Raises naming the row when lengths disagree."""
    prompt_lens, response_lens = tuple(map(int, prompt_lens)), tuple(map(int, response_lens))
    b = len(prompt_lens)
    if not (len(response_lens) == b == advantages.shape[0]):
        raise ValueError(
            f"{b} prompt lengths, {len(response_lens)} response lengths and "
            f"{advantages.shape[0]} advantages: one of each per sequence"
        )
    for name, flat, lens in (("prompt", prompt_tokens, prompt_lens),
                             ("response", response_tokens, response_lens)):  # fmt: skip
        if flat.dim() != 1 or flat.shape[0] != sum(lens):
            raise ValueError(
                f"{name} tokens{list(flat.shape)} must be flat [{sum(lens)}] (the sum of the "
                f"{name} lengths)"
            )
    if rollout_logp.shape != response_tokens.shape:
        raise ValueError(
            f"rollout log-probs{list(rollout_logp.shape)} must match the response tokens"
            f"{list(response_tokens.shape)}: one per response token"
        )
    for i, p in enumerate(prompt_lens):
        if p < 1:
            raise ValueError(f"sequence {i}: empty prompt")
    cpu = torch.device("cpu")
    p_len = torch.tensor(prompt_lens, dtype=torch.long, device=cpu)
    r_len = torch.tensor(response_lens, dtype=torch.long, device=cpu)
    s = _round_up(max((p + r for p, r in zip(prompt_lens, response_lens, strict=True)),
                      default=1), pad_multiple)  # fmt: skip
    # Flat position (row * s + column) of every prompt token and every response token: the
    # prompt tokens of row i start at i * s, its response tokens right after its prompt.
    row_start = torch.arange(b, device=cpu) * s
    p_at = flat_ranges(row_start, p_len)
    r_at = flat_ranges(row_start + p_len, r_len)
    responses = response_tokens.to(cpu, torch.long)
    input_ids = torch.full((b * s,), pad_id, dtype=torch.long, device=cpu)
    input_ids[p_at] = prompt_tokens.to(cpu, torch.long)
    input_ids[r_at] = responses
    # The position predicting response token j is the one before it.
    target = torch.full((b * s,), IGNORE_INDEX, dtype=torch.long, device=cpu)
    logp = torch.zeros(b * s, device=cpu)
    target[r_at - 1] = responses
    logp[r_at - 1] = rollout_logp.to(cpu, torch.float32)
    target, logp, input_ids = target.view(b, s), logp.view(b, s), input_ids.view(b, s)
    cut = tuple(bool(x) for x in truncated) if truncated is not None else (False,) * b
    if any(cut):
        target[torch.tensor(cut, dtype=torch.bool, device=cpu)] = IGNORE_INDEX
    lengths = RowLengths(prompt_lens, response_lens, response_lens).without_loss(cut)
    routes_bs = None
    if routes is not None:
        n_layers, k = routes.shape[1:]
        routes_bs = torch.arange(k, dtype=torch.long).expand(b * s, n_layers, k).clone()
        routes_bs[flat_ranges(row_start, p_len + r_len)] = routes.to(cpu, torch.long)
        routes_bs = routes_bs.view(b, s, n_layers, k)
    return TokenBatch(
        routes=routes_bs,
        input_ids=input_ids,
        target=target,
        loss_mask=(target != IGNORE_INDEX).float(),
        advantages=advantages.to(device=cpu, dtype=torch.float32),
        rollout_logp=logp,
        lengths=lengths,
    )


def build_token_batch_from_lists(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    rollout_logprobs: Sequence[Sequence[float]],
    advantages: torch.Tensor,
    pad_id: int,
    pad_multiple: int = 1,
) -> TokenBatch:
    """`build_token_batch` from per-row lists (tests and tools; the trainer's records are
    flat already). Raises naming the row when a row's log-probs and tokens disagree."""
    for i, (r, lp) in enumerate(zip(responses, rollout_logprobs, strict=True)):
        if len(lp) != len(r):
            raise ValueError(f"sequence {i}: {len(lp)} rollout log-probs for {len(r)} tokens")
    if not (len(prompts) == len(responses) == advantages.shape[0]):
        raise ValueError(
            f"{len(prompts)} prompts, {len(responses)} responses, {len(rollout_logprobs)} "
            f"log-prob lists and {advantages.shape[0]} advantages: one of each per sequence"
        )
    cat = lambda seqs, dt: torch.tensor([x for s in seqs for x in s], dtype=dt, device="cpu")  # noqa: E731
    return build_token_batch(
        cat(prompts, torch.long), [len(p) for p in prompts],
        cat(responses, torch.long), [len(r) for r in responses],
        cat(rollout_logprobs, torch.float32), advantages, pad_id, pad_multiple,
    )  # fmt: skip
