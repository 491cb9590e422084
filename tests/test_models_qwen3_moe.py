"""Qwen3-MoE (`Qwen3MoeForCausalLM`) on megatron-core's MoE layer: config, the experts' and
router's weight rules with experts sharded over EP, float64 logits and every gradient equal to
transformers' at EP=1 and EP=2 over gloo, the load-balancing loss's logged value, and
router replay (megatron's RouterReplay hook) giving the routing it is handed.

The tiny Qwen3-MoE (tests.tiny_models.tiny_hf_model): 2 layers, 4 experts of
width 48, top-2 renormalised, router logits of O(1) (clear top-k choices).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_agpo.models import ModelConfig, UnsupportedModelError, hf_to_megatron_tensors
from megatron_agpo.models.weights import HFWeights, rule_for, unpad_vocab
from tests.dist_utils import run_distributed
from tests.tiny_models import tiny_hf_model

ARCH = "Qwen3MoeForCausalLM"


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_moe")
    return {
        "f64": str(tiny_hf_model(root / "f64", ARCH, dtype=torch.float64)),
        "f32": str(tiny_hf_model(root / "f32", ARCH, seed=1)),
    }


# ----------------------------------------------------------------------------- unit
def test_config_reads_qwen3_moe(moe_dirs):
    cfg = ModelConfig.from_hf(moe_dirs["f64"])
    assert cfg.family == "qwen3_moe" and cfg.is_moe and cfg.qk_layernorm
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (4, 2, 48)
    assert cfg.moe_norm_topk_prob and cfg.moe_aux_loss_coeff == 0.0
    assert not ModelConfig.from_hf(tiny_hf_model_cfg_dense()).is_moe


def tiny_hf_model_cfg_dense() -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}  # fmt: skip


def test_exported_config_is_transformers_qwen3_moe(moe_dirs):
    from transformers import AutoConfig

    cfg = ModelConfig.from_hf(moe_dirs["f64"])
    hf = cfg.to_hf_config()
    assert ModelConfig.from_hf(hf) == cfg
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "transformers_version"})
    assert type(hf_cfg).__name__ == "Qwen3MoeConfig"
    assert (hf_cfg.num_experts, hf_cfg.num_experts_per_tok, hf_cfg.moe_intermediate_size) == (
        4, 2, 48)  # fmt: skip
    assert hf_cfg.norm_topk_prob is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mlp_only_layers": [1]}, "Qwen3MoeForCausalLM mlp_only_layers=\\[1\\] is not supported"),
        ({"decoder_sparse_step": 2}, "Qwen3MoeForCausalLM decoder_sparse_step=2 is not supported"),
    ],
)
def test_unsupported_qwen3_moe_options_refused(moe_dirs, extra, message):
    hf = json.loads(Path(moe_dirs["f32"], "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf({**hf, **extra})


def test_expert_parallel_must_divide_experts(moe_dirs):
    cfg = ModelConfig.from_hf(moe_dirs["f32"])
    cfg.validate(expert_parallel=4)
    with pytest.raises(ValueError, match="^num_experts=4 is not divisible by parallel.expert"):
        cfg.validate(expert_parallel=3)
    dense = ModelConfig.from_hf(tiny_hf_model_cfg_dense())
    with pytest.raises(ValueError, match="^parallel.expert_parallel=2 needs a mixture-of-exp"):
        dense.validate(expert_parallel=2)


def _megatron_shapes(cfg: ModelConfig, ep: int) -> list[tuple[str, torch.Size]]:
    """A TP=1 rank's local parameters of megatron's GPTModel for a Qwen3-MoE config at EP=ep,
    written out by hand (the dist test checks them against the model megatron builds)."""
    H, Fe, D = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.head_dim
    Q, G, E = cfg.num_attention_heads, cfg.num_query_groups, cfg.num_experts
    S = torch.Size
    out = [("embedding.word_embeddings.weight", S([cfg.padded_vocab_size, H]))]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        out += [
            (p + "input_layernorm.weight", S([H])),
            (p + "self_attention.linear_proj.weight", S([H, Q * D])),
            (p + "self_attention.linear_qkv.weight", S([(Q + 2 * G) * D, H])),
            (p + "self_attention.q_layernorm.weight", S([D])),
            (p + "self_attention.k_layernorm.weight", S([D])),
            (p + "pre_mlp_layernorm.weight", S([H])),
            (p + "mlp.router.weight", S([E, H])),
        ]
        for j in range(E // ep):
            out += [
                (p + f"mlp.experts.local_experts.{j}.linear_fc1.weight", S([2 * Fe, H])),
                (p + f"mlp.experts.local_experts.{j}.linear_fc2.weight", S([H, Fe])),
            ]
    out.append(("decoder.final_layernorm.weight", S([H])))
    if not cfg.tie_word_embeddings:
        out.append(("output_layer.weight", S([cfg.padded_vocab_size, H])))
    return out


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_weight_rules_round_trip_bit_exact_over_ep(moe_dirs, ep):
    """HF -> every EP rank's experts (and the router) -> HF, by the rules alone (one
    process): each HF expert lands on exactly one EP rank, and every HF tensor comes back
    bit-exact with none left out."""
    hf = HFWeights(moe_dirs["f32"])
    cfg = ModelConfig.from_hf(moe_dirs["f32"])
    shapes = _megatron_shapes(cfg, ep)
    local = cfg.num_experts // ep
    back: dict[str, torch.Tensor] = {}
    for r in range(ep):
        shard = dict(hf_to_megatron_tensors(hf.get, shapes, cfg, expert_offset=r * local))
        for name, t in shard.items():
            rule = rule_for(name, cfg, expert_offset=r * local)
            if rule.expert is None and r > 0:
                continue  # replicated over EP
            for hf_name, piece in zip(rule.hf_names, rule.to_hf(t), strict=True):
                assert hf_name not in back, f"{hf_name} on two EP ranks"
                back[hf_name] = unpad_vocab(piece, cfg) if rule.vocab else piece
    assert sorted(back) == sorted(hf.keys())
    for name in hf:
        assert torch.equal(hf.get(name), back[name]), name
    # Expert 3 of layer 1 is local expert 1 of EP rank 1 at EP=2.
    rule = rule_for("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight", cfg,
                    expert_offset=2)  # fmt: skip
    assert rule.hf_names == ("model.layers.1.mlp.experts.3.down_proj.weight",)
    te = rule_for("decoder.layers.1.mlp.experts.linear_fc1.weight1", cfg, expert_offset=2)
    assert te.hf_names == ("model.layers.1.mlp.experts.3.gate_proj.weight",
                           "model.layers.1.mlp.experts.3.up_proj.weight")  # fmt: skip


# ----------------------------------------------------------------------------- multi-process
def _hf_model(hf_dir: str, dtype: torch.dtype, f32_routing_weights: bool = False):
    """transformers' model with its experts looped in eager mode (its grouped_mm has no
    float64), and its RMSNorms and router softmax kept in the input's dtype (as shipped both
    round to float32: 5e-8 in the logits). f32_routing_weights: the routing weights rounded to
    float32 as megatron-core computes them (softmax over the top-k logits in float32, whatever
    `moe_router_dtype`), for a reference that differs from megatron's by rounding alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=dtype, experts_implementation="eager"
    ).eval()

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    for m in model.modules():
        if type(m).__name__ == "Qwen3MoeRMSNorm":
            m.eps = m.variance_epsilon
            m.forward = forward.__get__(m)
    model.f32_routing_weights = f32_routing_weights
    force_hf_routes(model, None)
    return model


def force_hf_routes(model, routes_LBSK: list[torch.Tensor] | None):
    """Make transformers' routers choose the given experts ([B, S, K] per layer; None: their
    own top-k), the weights the softmax of the router's logits renormalised over those
    experts, in the input's dtype (norm_topk_prob=True)."""
    f32 = model.f32_routing_weights
    for i, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate
        idx = None if routes_LBSK is None else routes_LBSK[i].reshape(-1, gate.top_k)

        def forward(self, h, idx=idx):
            logits = F.linear(h, self.weight)
            top = torch.topk(logits, self.top_k, dim=-1).indices if idx is None else idx
            chosen = logits.gather(1, top)
            if f32:
                return logits, torch.softmax(chosen, -1, dtype=torch.float32).to(h.dtype), top
            probs = torch.softmax(logits, dim=-1)
            weights = probs.gather(1, top)
            return logits, weights / weights.sum(-1, keepdim=True), top

        gate.forward = forward.__get__(gate)


def _per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 holds each layer's experts fused in memory (`experts.gate_up_proj`
    [E, 2F, H], gate rows first; `experts.down_proj` [E, H, F]); the checkpoint's names are
    per expert."""
    out = {}
    for n, t in tensors.items():
        if n.endswith("experts.gate_up_proj"):
            base = n[: -len("gate_up_proj")]
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
        elif n.endswith("experts.down_proj"):
            base = n[: -len("down_proj")]
            out.update({f"{base}{e}.down_proj.weight": w for e, w in enumerate(t)})
        else:
            out[n] = t
    return out


def _ids(seed: int, batch: int = 4, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _bsk_to_megatron(routes_LBSK):
    """[B, S, K] per layer -> megatron's token order (s * B + b) [S*B, K]."""
    return [r.transpose(0, 1).reshape(-1, r.shape[-1]) for r in routes_LBSK]


def _megatron_to_bsk(routes_LTK, batch: int):
    return [r.reshape(-1, batch, r.shape[-1]).transpose(0, 1) for r in routes_LTK]


def _parity_body(rank, world, hf_dir, results_path, eps=(1, 2)):
    from megatron.core import parallel_state as ps

    from megatron_agpo.models import (
        build_model_from_hf,
        forward_logits,
        gather_hf_tensors_to_rank0,
        megatron_to_hf_tensors,
    )
    from megatron_agpo.models.moe import record_routes, recorded_routes, set_router_replay
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    ids = _ids(0)
    hf_model = _hf_model(hf_dir, torch.float64, f32_routing_weights=True)
    with torch.no_grad():
        out = hf_model(ids, output_router_logits=True)
        ref64 = _hf_model(hf_dir, torch.float64)(ids).logits
    ref = out.logits
    # transformers' own routes (top-2 of its router's softmax), [B, S, K] per layer
    hf_routes = [torch.topk(lg.view(*ids.shape, -1), 2, dim=-1).indices for lg in out.router_logits]
    hf = HFWeights(hf_dir)
    report = {}
    for ep in eps:
        init_parallel(ParallelConfig(expert_parallel=ep))
        assert ps.get_expert_model_parallel_world_size() == ep
        model, cfg = build_model_from_hf(hf_dir)
        params = dict(model.named_parameters())
        assert {n: p.shape for n, p in params.items()} == dict(_megatron_shapes(cfg, ep))
        model.eval()
        record_routes(model)
        with torch.no_grad():
            got = forward_logits(model, ids)[..., : cfg.vocab_size]
        routes = _megatron_to_bsk(recorded_routes(model), ids.shape[0])
        record_routes(model, on=False)
        diff = report[f"ep{ep}"] = (got - ref).abs().max().item()
        diff64 = report[f"ep{ep}_vs_f64_routing_weights"] = (got - ref64).abs().max().item()
        # Logits are O(1); a misplaced expert or router moves them by O(0.1).
        assert diff < 1e-12, f"EP={ep}: max|logits - transformers'| = {diff:.3g}"
        assert diff64 < 1e-7, f"EP={ep}: vs float64 routing weights {diff64:.3g}"
        for a, b in zip(routes, hf_routes, strict=True):  # same experts (order within top-k)
            assert torch.equal(a.sort(-1).values, b.sort(-1).values)
        # Replay: routes other than the router's own (each token's two lowest-scoring experts)
        # are taken, and the logits are transformers' forced to the same routes.
        forced = [
            torch.topk(lg.view(*ids.shape, -1), 2, dim=-1, largest=False).indices
            for lg in out.router_logits
        ]
        set_router_replay(model, _bsk_to_megatron(forced))
        with torch.no_grad():
            got_r = forward_logits(model, ids)[..., : cfg.vocab_size]
        assert all(
            torch.equal(a, b)
            for a, b in zip(_megatron_to_bsk(recorded_routes(model), 4), forced, strict=True)
        )
        set_router_replay(model, None)
        force_hf_routes(hf_model, forced)
        with torch.no_grad():
            ref_r = hf_model(ids).logits
        force_hf_routes(hf_model, None)
        report[f"ep{ep}_replayed_vs_own"] = (got_r - ref).abs().max().item()
        diff_r = report[f"ep{ep}_replay"] = (got_r - ref_r).abs().max().item()
        assert diff_r < 1e-12, f"EP={ep} replay: max|logits - forced transformers'| {diff_r:.3g}"
        assert report[f"ep{ep}_replayed_vs_own"] > 1e-2  # the replayed routes changed the output
        # Megatron -> HF (experts all-gathered over EP): bit-exact, on every rank.
        back = dict(megatron_to_hf_tensors(model, cfg))
        assert sorted(back) == sorted(hf.keys())
        for name in hf:
            assert torch.equal(back[name], hf.get(name)), f"EP={ep}: {name} differs"
        back0 = dict(gather_hf_tensors_to_rank0(model, cfg))
        if rank == 0:
            assert sorted(back0) == sorted(hf.keys())
    if rank == 0:
        Path(results_path).write_text(json.dumps(report))


@pytest.mark.dist
def test_logits_equal_transformers_float64_ep1_ep2_and_replay(moe_dirs, tmp_path):
    """float64 logits of megatron's MoE model at EP=1 and EP=2 (2 gloo ranks, all-to-all
    dispatch) equal transformers' Qwen3MoeForCausalLM to 1e-12 and route every token to the
    same experts; with router replay of other routes the logits equal transformers' forced to
    those routes; the experts gathered back over EP are bit-exact."""
    out = tmp_path / "parity.json"
    run_distributed(_parity_body, 2, moe_dirs["f64"], str(out))
    print(json.loads(out.read_text()))


def _grads_body(rank, world, hf_dir, results_path, eps=(1, 2)):
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_agpo.models import build_model_from_hf, mask_vocab_padding_
    from megatron_agpo.models.moe import pop_aux_losses, set_router_replay
    from megatron_agpo.models.weights import megatron_to_hf_tensors
    from megatron_agpo.parallel import (
        OptimizerSettings,
        ParallelConfig,
        init_parallel,
        wrap_for_training,
    )

    ids = _ids(4, batch=4, seq=11)
    inp_all, labels_all = ids[:, :-1], ids[:, 1:]
    per = ids.shape[0] // world
    mine = slice(per * rank, per * (rank + 1))  # DP=world: each rank its share of the batch
    inp, labels = inp_all[mine], labels_all[mine]
    hf_model = _hf_model(hf_dir, torch.float64, f32_routing_weights=True)
    with torch.no_grad():
        own = hf_model(inp_all, output_router_logits=True).router_logits
    low = [torch.topk(lg.view(*inp_all.shape, -1), 2, -1, largest=False).indices for lg in own]

    def hf_grads(routes):
        hf_model.zero_grad()
        force_hf_routes(hf_model, routes)
        logits = hf_model(inp_all).logits
        F.cross_entropy(logits.flatten(0, 1), labels_all.flatten()).backward()
        force_hf_routes(hf_model, None)
        return _per_expert({n: p.grad.clone() for n, p in hf_model.named_parameters()})

    report = {}
    for ep in eps:
        own_grads = None
        for case, routes, coeff in (("own", None, 0.0), ("replay", low, 0.0), ("aux", None, 1e-2)):
            # megatron's distributed optimizer takes no float64 parameters; its plain one does
            par = ParallelConfig(expert_parallel=ep, use_distributed_optimizer=False)
            init_parallel(par)
            model, cfg = build_model_from_hf(hf_dir, moe_aux_loss_coeff=coeff)
            ddp, _ = wrap_for_training(model, par, OptimizerSettings(lr=1e-2, clip_grad=0.0))
            if routes is not None:
                set_router_replay(model, _bsk_to_megatron([r[mine] for r in routes]))

            def loss_fn(logits_BSV, cfg=cfg):
                mask_vocab_padding_(logits_BSV, cfg)
                loss = tensor_parallel.vocab_parallel_cross_entropy(logits_BSV, labels)
                return loss.mean(), {}

            def step(it, m):
                b = next(it)
                return m(b, torch.arange(b.shape[1]).expand_as(b), None), loss_fn

            ddp.zero_grad_buffer()
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([inp]), model=[ddp],
                num_microbatches=1, seq_length=inp.shape[1], micro_batch_size=inp.shape[0],
                forward_only=False,
            )  # fmt: skip
            aux = pop_aux_losses(cfg.num_layers)
            set_router_replay(model, None)
            grads = {n: p.main_grad for n, p in model.named_parameters()}
            got = dict(megatron_to_hf_tensors(grads, cfg))
            key = f"ep{ep}_{case}"
            router = "model.layers.0.mlp.gate.weight"
            report[key] = {"aux": aux, "router_grad_norm": got[router].norm().item()}
            if case == "aux":
                # The load-balancing loss's gradient reaches the router and, through the
                # router's input, every layer below it: no transformers reference (its
                # formula pools all layers' tokens); the logged value is checked instead:
                # E * sum_e f_e * P_e of each layer (f_e: share of the top-k slots routed to
                # e, P_e: mean softmax probability) over this rank's tokens, averaged over
                # layers and over the DP ranks, from transformers' router logits.
                lb = []
                for lg in own:
                    p_TE = torch.softmax(lg.view(*inp_all.shape, -1)[mine].flatten(0, 1), -1)
                    top = torch.topk(p_TE, 2, -1).indices
                    f_E = F.one_hot(top, 4).sum((0, 1)) / top.numel()
                    lb.append(4 * (f_E * p_TE.mean(0)).sum())
                want = torch.stack(lb).mean().reshape(1)
                torch.distributed.all_reduce(want)
                want = want.item() / world
                report[key]["aux_want"] = want
                assert abs(aux["load_balancing_loss"] - want) < 1e-6 * want, (aux, want)
                moved = (got[router] - own_grads[router]).abs().max().item()
                report[key]["router_grad_change"] = moved
                assert moved > 1e-6  # the loss reached the router
                continue
            assert aux == {}  # nothing tracked with the loss off
            ref = hf_grads(routes)
            assert sorted(got) == sorted(ref)
            rel = {n: ((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref}
            worst = max(rel, key=rel.get)
            report[key].update(worst=worst, rel_err=rel[worst])
            # megatron-core computes the routing weights' softmax (and so its backward) in
            # float32 whatever the router dtype: gradients that pass through the routing
            # weights carry float32 rounding (1e-7 relative).
            assert rel[worst] < 1e-6, f"{key}: {worst} gradient off by {rel[worst]:.3g} (rel.)"
            assert got[router].abs().max() > 0  # the router learns, replayed or not
            if case == "own":
                own_grads = got
    if rank == 0:
        Path(results_path).write_text(json.dumps(report))


@pytest.mark.dist
def test_gradients_ep1_ep2_equal_transformers_with_and_without_replay(moe_dirs, tmp_path):
    """Every parameter's gradient (float64, DP=2 with each rank its half of the batch) at EP=1
    and EP=2 equals transformers' on the whole batch: with the router's own top-k, and with
    replayed routes (transformers forced to the same routes). With replay the router still
    gets a gradient (through the routing weights of the replayed experts). With
    moe_aux_loss_coeff > 0 the logged load-balancing loss equals the formula on transformers'
    router logits (its gradient reaches only the router, whose comparison is then skipped)."""
    out = tmp_path / "grads.json"
    run_distributed(_grads_body, 2, moe_dirs["f64"], str(out))
    print(json.loads(out.read_text()))


@pytest.mark.parametrize(
    ("which", "argv", "expected"),
    [
        ("moe", ["parallel.expert_parallel=3", "parallel.tensor_parallel=1", "nproc=3"],
         "parallel.expert_parallel=3 does not divide the 4 experts of model.hf_path"),
        ("dense", ["model.router_replay=rollout", "rollout.mode=colocated"],
         "model.router_replay=rollout needs a mixture-of-experts model; model.hf_path is "
         "Qwen3ForCausalLM, a dense model"),
        ("dense", ["parallel.expert_parallel=2", "parallel.tensor_parallel=1"],
         "parallel.expert_parallel=2 needs a mixture-of-experts model; model.hf_path is "
         "Qwen3ForCausalLM"),
        ("tiny", ["model.router_replay=rollout", "rollout.mode=colocated"],
         "model.router_replay=rollout needs a mixture-of-experts model; the tiny model"),
        ("moe", ["model.router_replay=rollout"],
         "model.router_replay=rollout needs rollout.mode=colocated"),
        ("moe", ["model.router_replay=rollout", "rollout.mode=colocated"],
         "model.router_replay=rollout needs the engine's routed experts, which vLLM returns "
         "only on a CUDA GPU"),
    ],
)  # fmt: skip
def test_bad_moe_settings_one_line_exit_2(moe_dirs, tmp_path, which, argv, expected, capsys,
                                          monkeypatch):  # fmt: skip
    """EP that does not divide the experts, router replay or EP on a dense model: one line
    naming the key, exit 2, before anything is launched."""
    from megatron_agpo import train

    monkeypatch.delenv("AGPO_DEBUG", raising=False)
    launched = []
    monkeypatch.setattr(train, "_launch", lambda *a: launched.append(a) or 0)
    monkeypatch.setattr(train, "run", lambda *a: launched.append(a) or 0)
    dense = tiny_hf_model(tmp_path / "dense", "Qwen3ForCausalLM")
    path = {"moe": moe_dirs["f32"], "dense": str(dense), "tiny": ""}[which]
    capsys.readouterr()  # transformers' progress bars
    rc = train.main([f"model.hf_path={path}", *argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and not out and not launched
    if which == "moe" and "rollout.mode=colocated" not in argv and not torch.cuda.is_available():
        lines = [x for x in lines if "which vLLM returns only on a CUDA GPU" not in x]
    assert len(lines) == 1 and lines[0].startswith(f"agpo-train: error: {expected}"), lines
