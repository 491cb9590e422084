"""The checkpoint layer's one error, and how every rank comes to raise the same one."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_agpo.parallel import broadcast_bytes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupted, from another model or
    an incompatible layout. The message names the file and what to do."""


def broadcast_error(err: str | None) -> None:
    """Rank 0's verdict on every rank: all raise the same error, or none does. Sent as UTF-8
    bytes in a tensor (NCCL needs it on the GPU), never pickled."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        nccl = dist.get_backend() == "nccl"
        dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        err = broadcast_bytes((err or "").encode(), 0, device=dev).decode()
    if err:
        raise CheckpointError(err)
