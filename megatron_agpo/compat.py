"""CPU compatibility layer for megatron-core 0.16.1, active only where CUDA is absent.

megatron-core assumes a GPU in a few places on the paths this project uses (GPTModel with the
local layer spec, tensor/pipeline parallel, DDP + distributed optimizer, the pipeline
schedules). On CPU-only machines those calls raise "Torch not compiled with CUDA enabled",
which would leave TP/PP/DP untestable on a laptop or CI. The patches below redirect exactly
those calls to the CPU and nothing else:

1. Module-scoped torch: in the megatron-core modules listed in `_CUDA_MODULES` the global name
   `torch` is replaced by `_TorchOnCpu`, a thin proxy that forwards every attribute to the real
   torch except
   - tensor factories (`zeros`, `empty`, `ones`, `full`, `tensor`, `arange`, ...) given
     `device="cuda"`: the schedules' `total_num_tokens`, the default causal mask, the grad
     scaler / optimizer bookkeeping scalars;
   - `torch.cuda.current_device()` -> the CPU device: rotary embeddings' `inv_freq`, p2p
     receive buffers, the DDP grad buffers, attention buffers;
   - `torch.cuda.synchronize/empty_cache` -> no-ops (p2p "race condition" sync);
   - `torch.cuda.{get_rng_state,set_rng_state,manual_seed}` -> the CPU generator.
   The real `torch` module is never modified, so code outside those modules is unaffected.
2. The CUDA RNG tracker (`tensor_parallel/random.py`): its private get/set-state helpers use
   `torch._C`/`_lazy_call`, which on a CPU build silently queue the call forever; they are
   replaced by the CPU generator's get/set so `fork()` really swaps and restores state.
3. Tensor methods: the optimizers' dtype checks compare `param.type()` with
   `'torch.cuda.FloatTensor'` etc., and the tied-embedding set-up of a pipelined model moves the
   weight with `weight.data.cuda()`, and gradient clipping asserts the CUDA type name of each
   grad. While the few megatron functions listed in `enable()` run,
   `Tensor.type()` reports the CUDA name of a CPU tensor's type and `Tensor.cuda()` returns the
   tensor itself; outside them both are torch's own.

`enable()` is idempotent and a no-op when CUDA is available. Call it before building models
(`megatron_agpo.parallel.init_parallel` does).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import types

import torch

_ENABLED = False
_LOCK = threading.Lock()

# Modules whose module-level `torch` is swapped for the proxy (see the docstring, point 1).
_CUDA_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.module",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    # Mixture of experts: the router moves its weight to `torch.cuda.current_device()` before
    # gating; the all-to-all dispatcher copies its split sizes to the host on a side
    # `torch.cuda.Stream` and waits on its event (both stand-ins below); the experts allocate
    # their token counts on the current device.
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_layer",
)

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like",
)  # fmt: skip

_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # an ordinal means a CUDA device in torch's factories
        return True
    return torch.device(device).type == "cuda"


def _redirect(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return wrapper


class _HostStream:
    """A CUDA stream (and its event) where there is only the host: work is already done in
    order when it is queued, so waits and synchronisations return at once. The MoE all-to-all
    dispatcher copies its split sizes device-to-host on a side stream and waits on its event;
    on the CPU those copies are plain tensors already."""

    def wait_stream(self, _other) -> None:
        return None

    def record_event(self, *_args, **_kwargs):
        return self

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, _HostStream)

    def __hash__(self) -> int:
        return 0


_HOST_STREAM = _HostStream()


class _CudaOnCpu:
    """Stands in for `torch.cuda` inside the patched modules."""

    Event = staticmethod(lambda *_a, **_k: _HOST_STREAM)
    Stream = staticmethod(lambda *_a, **_k: _HOST_STREAM)

    random = types.SimpleNamespace(
        get_rng_state=lambda device=None: torch.get_rng_state(),
        set_rng_state=lambda state, device=None: torch.set_rng_state(state),
    )

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def current_stream(device=None):
        return _HOST_STREAM

    @staticmethod
    def stream(_stream):
        return contextlib.nullcontext()

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        torch.manual_seed(seed)


class _TorchOnCpu(types.ModuleType):
    """Forwards to the real torch; redirects CUDA allocations to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _redirect(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_type_patch_depth = 0
_ORIG_TENSOR_TYPE = torch.Tensor.type
_ORIG_TENSOR_CUDA = torch.Tensor.cuda


def _type_as_cuda(self, *args, **kwargs):
    out = _ORIG_TENSOR_TYPE(self, *args, **kwargs)
    if args or kwargs:  # a conversion call (t.type(dtype)), not a query
        return out
    return _CUDA_TYPE_NAMES.get(out, out)


def _cuda_is_identity(self, *args, **kwargs):
    return self


@contextlib.contextmanager
def _cuda_type_names():
    """While active, `t.type()` of a CPU float tensor reports the CUDA type name and
    `t.cuda()` is the identity."""
    global _type_patch_depth
    with _LOCK:
        _type_patch_depth += 1
        torch.Tensor.type = _type_as_cuda
        torch.Tensor.cuda = _cuda_is_identity
    try:
        yield
    finally:
        with _LOCK:
            _type_patch_depth -= 1
            if _type_patch_depth == 0:
                torch.Tensor.type = _ORIG_TENSOR_TYPE
                torch.Tensor.cuda = _ORIG_TENSOR_CUDA


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper._agpo_compat = True
    return wrapper


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """`moe_utils.maybe_move_tensor_to_cpu` for tensors already on the host."""
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _router_gemm_without_te() -> None:
    """megatron-core 0.16.1's router gating (`moe_utils.RouterGatingLinearFunction`) tests
    `te_general_gemm is not None`, but the name is bound only when Transformer Engine imports:
    without TE every MoE forward raises NameError. Bound to None, the router takes its own
    torch.mm path (in the router dtype), which is also the path it takes in float64. Needed
    wherever TE is absent, with or without CUDA."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def enable() -> bool:
    """Install the CPU patches once. Returns True when they are active (no CUDA)."""
    global _ENABLED
    _router_gemm_without_te()
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ENABLED:
            return True
        proxy = _TorchOnCpu()
        for name in _CUDA_MODULES:
            mod = importlib.import_module(name)
            if getattr(mod, "torch", None) is torch:
                mod.torch = proxy

        from megatron.core.tensor_parallel import random as mrandom

        mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
            torch.get_rng_state()
        )
        mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
            torch.set_rng_state(new_state)
        )

        from megatron.core.models.common.language_module.language_module import LanguageModule
        from megatron.core.optimizer import distrib_optimizer, optimizer

        targets = [
            (LanguageModule, "setup_embeddings_and_output_layer"),
            (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
            (distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups"),
            (distrib_optimizer.DistributedOptimizer, "__init__"),
        ]
        for cls, attr in targets:
            raw = cls.__dict__[attr]
            fn = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw
            if getattr(fn, "_agpo_compat", False):
                continue
            wrapped = _with_cuda_type_names(fn)
            if isinstance(raw, staticmethod):
                wrapped = staticmethod(wrapped)
            elif isinstance(raw, classmethod):
                wrapped = classmethod(wrapped)
            setattr(cls, attr, wrapped)
        # The all-to-all dispatcher turns its split sizes into host numpy arrays with
        # `maybe_move_tensor_to_cpu(t, as_numpy=True)`, which converts only CUDA tensors: on
        # the CPU they stayed tensors and gloo's all_to_all_single refused them as split
        # sizes. The stand-in converts host tensors too.
        from megatron.core.transformer.moe import token_dispatcher

        token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
        # Module-level functions with the same dtype assertion (`param.grad.type() ==
        # 'torch.cuda.FloatTensor'`), rebound wherever they were imported by name.
        from megatron.core.optimizer import clip_grads

        wrapped_clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
        for mod in (clip_grads, optimizer):
            if not getattr(mod.clip_grad_by_total_norm_fp32, "_agpo_compat", False):
                mod.clip_grad_by_total_norm_fp32 = wrapped_clip
        _ENABLED = True
    return True
