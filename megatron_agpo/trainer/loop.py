"""The AGPO trainer: build once, then each step runs the ten stages of docs/TRAINING.md.

    rollout -> reward -> broadcast -> advantages (-> dynamic sampling) -> token batch
    -> old/reference log-probs -> update -> (skip on inf/NaN) -> weight sync -> eval / save

Every rank runs the same loop. Rank 0 alone talks to the rollout engine and the reward, and
broadcasts the scored rollouts (`ScoredRollouts`, as tensors), so every rank builds the same
batch; each data-parallel rank then trains on its own shard of the rows. The policy is
megatron-core (TP x PP x DP, optional sequence parallelism), the loss the fused vocab-parallel
AGPO loss, the engine real vLLM (replica processes or in-process) behind one protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_agpo.algorithms import advantages as compute_advantages
from megatron_agpo.algorithms import (
    group_rows,
    informative_groups,
    whiten,
)
from megatron_agpo.algorithms.policy_loss import resolve_norm_constant
from megatron_agpo.models.moe import tracked_aux_losses
from megatron_agpo.parallel import global_rank
from megatron_agpo.rewards.base import RewardUnavailable, reward_counters, scored_groups
from megatron_agpo.rollout.types import RolloutError, StaleWeightsError
from megatron_agpo.trainer import checkpoint as ckpt
from megatron_agpo.trainer import rundir
from megatron_agpo.trainer.batch import (
    TokenBatch,
    balanced_partition,
    build_token_batch,
    row_scales,
)
from megatron_agpo.trainer.config import TrainConfig, background_sync_on
from megatron_agpo.trainer.metrics import MetricsWriter, plot_run, wandb_settings
from megatron_agpo.trainer.records import RolloutFailed, ScoredRollouts, broadcast_scored
from megatron_agpo.trainer.step import (
    StepShape,
    compute_logp,
    dp_size_and_rank,
    forward_backward,
    grads_are_finite,
    model_device,
    resolve_packing,
    sequence_multiple,
)


def failure_line(e: BaseException) -> str:
    """An engine error's first line, without the log tail: what the run's error names."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[0].split("; log tail:")[0]


def sampling_seed(run_seed: int, step: int, index: int, round_: int = 0) -> int:
    """A request's sampling seed: fixed by (run, step, dynamic-sampling round, prompt), so a
    resumed run resamples exactly what the uninterrupted run sampled."""
    key = f"{run_seed}:{step}:{index}" if round_ == 0 else f"{run_seed}:{step}:{round_}:{index}"
    h = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(h[:4], "little")


class Timer:
    """Seconds per stage of one step (`with t("rollout"): ...`), summed over repeats.

    On CUDA a stage's time is measured between CUDA events recorded on the current stream,
    so work the host only enqueued is counted where the GPU runs it; the events are read
    (one synchronisation) when the step's metrics are logged, not inside the step."""

    def __init__(self, cuda: bool = False) -> None:
        self._host: dict[str, float] = {}
        self._events: list[tuple[str, object, object]] = []
        self.cuda = cuda

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host[name] = self._host.get(name, 0.0) + time.perf_counter() - t0

    @property
    def seconds(self) -> dict[str, float]:
        out = dict(self._host)
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        return out


def ensure_policy_dir(cfg: TrainConfig, log=print) -> Path:
    """The HF folder the policy and the engine start from (the tiny model is built and
    warm-started here on first use)."""
    if cfg.model.hf_path:
        return Path(cfg.model.hf_path)
    from megatron_agpo.trainer.warmstart import tiny_policy_dir

    return tiny_policy_dir(cfg.model, cfg.data, log=log)


def build_scheduler(optimizer, cfg: TrainConfig):
    """megatron's lr schedule over the run's optimizer updates. The config wins over a
    checkpoint's settings on resume (override); the update count comes from the checkpoint."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s, lr, wd = cfg.scheduler, cfg.optimizer.lr, cfg.optimizer.weight_decay
    for group in optimizer.param_groups:
        # megatron reads a group's own max/min lr before the scheduler's (min_lr is None there
        # unless set); every group of ours follows the one schedule.
        group["max_lr"], group["min_lr"] = lr, s.min_lr
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if s.warmup_steps else lr,
        max_lr=lr,
        min_lr=s.min_lr,
        lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=cfg.total_updates(),
        lr_decay_style=s.decay_style,
        start_wd=wd,
        end_wd=wd,
        wd_incr_steps=cfg.total_updates(),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


class Trainer:
    _engine_failure: str | None = None
    """Rank 0: the rollout engine's failure (one line), once a call to it failed; the next
    broadcast of scored rollouts carries it to every rank (`RolloutFailed`)."""
    stream = None
    """Overlapped generation's in-flight batches (`overlap.RolloutStream`), when
    trainer.max_staleness > 0; None: the synchronous loop."""
    _sync_wait_s = 0.0
    """Rank 0: seconds inside the engine's weight update since the last step's metrics."""
    _bg = None
    """The weight sync running in the background (`overlap.BackgroundSync`), until joined."""
    _sync_exposed_s = _sync_background_s = 0.0
    """Rank 0, background sync: seconds the trainer waited for it (joins) and seconds it ran,
    since the last step's metrics."""

    def __init__(self, cfg: TrainConfig) -> None:
        from transformers import AutoTokenizer

        from megatron_agpo.data.iterator import PromptIterator
        from megatron_agpo.data.tasks import load_task
        from megatron_agpo.models import build_model_from_hf
        from megatron_agpo.parallel import init_parallel, wrap_for_training

        cfg.validate()
        self.cfg = cfg
        self._correct_precision_mismatch()
        init_parallel(cfg.parallel)
        self.rank = global_rank()
        self.run_dir = Path(cfg.logging.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ensure_policy_dir(cfg)  # the warm start, once; the other ranks find it cached
        dist.barrier()
        self.policy_dir = ensure_policy_dir(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_dir)
        build = dict(
            params_dtype=cfg.model.params_dtype,
            sequence_parallel=cfg.parallel.sequence_parallel,
            **cfg.model.megatron_overrides(),
        )
        model, self.mcfg = build_model_from_hf(self.policy_dir, **build)
        self.vocab_size = self.mcfg.vocab_size
        self.model, self.optimizer = wrap_for_training(model, cfg.parallel, cfg.optimizer)
        self.device = model_device(self.model)
        self.seq_multiple = sequence_multiple(self.model)
        tr = cfg.trainer
        packing = resolve_packing(self.model, tr.packing)
        self.step_shape = StepShape(tr.micro_batch_size, tr.token_budget, packing)
        # seq-sum-constant's fixed divisor (Dr. GRPO: the maximum response length), never the
        # batch's padded length, which changes from step to step.
        self.norm_constant = resolve_norm_constant(cfg.algorithm.loss, cfg.rollout.max_new_tokens)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.ref_model = None
        if cfg.algorithm.loss.kl_coef != 0.0:
            # The KL anchor: frozen, no optimizer, same parallel layout as the policy.
            ref_dir = cfg.model.reference_hf_path or self.policy_dir
            self.ref_model, _ = build_model_from_hf(ref_dir, **build)
            self.ref_model.eval()
        task = load_task(
            cfg.data, self.tokenizer, cfg.rollout.engine.max_model_len, cfg.rollout.max_new_tokens
        )
        self.train_prompts, self.eval_prompts = task.train, task.held_out
        self.prompt_stats = task.stats_dict()
        self.data = PromptIterator(
            self.train_prompts, batch_size=cfg.data.prompts_per_step, seed=cfg.data.seed
        )
        self.step, self.version, self.skipped_in_row = 0, 0, 0
        self.engine = self.reward = self.metrics = None
        # Before the services start: the replicas must not inherit the handlers.
        self.preemption = ckpt.install_preemption(cfg.checkpoint)
        self._stream_start = 0
        self._resume()
        if tr.max_staleness > 0:  # overlapped generation (rank 0 submits, every rank draws)
            from megatron_agpo.trainer.overlap import RolloutStream

            self.stream = RolloutStream(tr.max_staleness, self.data, self._stream_start)
        self.background_sync = background_sync_on(cfg.trainer, cfg.rollout)
        if self.background_sync:  # collective: the gather's own groups (TP, EP, pipeline)
            from megatron_agpo.models import GatherGroups

            self._gather_groups = GatherGroups.mirror(self.mcfg)
        self._idle_seen: list[float] = []
        if self.rank == 0:
            self._start_services()
        if self.version > 0:  # resumed: the engine starts from the original weights
            self.sync_weights(self.version)
        self._sync_wait_s = 0.0

    # ----------------------------------------------------------------- build helpers
    def _correct_precision_mismatch(self) -> None:
        """Truncated importance sampling on when the engine samples at another precision than
        the trainer computes (FP8 rollouts, bf16 engine vs fp32 trainer...): the samples then
        come from a slightly different policy than the trainer's old one."""
        from megatron_agpo.models.precision import needs_tis, resolve_tis_cap

        loss = self.cfg.algorithm.loss
        cap = resolve_tis_cap(loss.tis_cap, needs_tis(self.cfg.model, self.cfg.rollout.engine))
        if cap != loss.tis_cap:
            self.cfg.algorithm.loss = dataclasses.replace(loss, tis_cap=cap)
            if global_rank() == 0:
                print(
                    f"rollout and trainer precisions differ: truncated importance sampling on "
                    f"(algorithm.loss.tis_cap={cap})",
                    flush=True,
                )

    def _start_services(self) -> None:
        """Rank 0: the rollout engine (replicas or colocated: one protocol), the reward and the
        metrics writer."""
        from megatron_agpo.rewards import build_reward

        e = self.cfg.rollout.engine
        if not e.model_path:
            e.model_path = str(self.policy_dir)
        if self.cfg.model.router_replay == "rollout":  # each token's experts, replayed
            e.return_routed_experts = True
        if self.cfg.rollout.mode == "replicas":
            from megatron_agpo.rollout.replicas import ReplicaPool

            self.engine = ReplicaPool(e, log_dir=self.run_dir / "replica_logs")
        else:
            from megatron_agpo.rollout.colocated import ColocatedEngine

            self.engine = ColocatedEngine(e)
        self.reward = build_reward(self.cfg.reward)
        self.metrics = MetricsWriter(
            self.run_dir,
            self.cfg.logging.tensorboard,
            self.cfg.trainer.steps,
            self.cfg.logging.progress,
            start_step=self.step,
            wandb=wandb_settings(self.cfg),
        )

    def _resume(self) -> None:
        c, log = self.cfg.checkpoint, lambda m: print(m, flush=True)
        try:
            # One run per folder (exit 2 naming the holder); then a torn metrics line cut.
            self.run_lock = rundir.claim(self.run_dir, log=log)
            rundir.collective(lambda: ckpt.repair_metrics(self.run_dir / "metrics.jsonl"))
            found = ckpt.resume(
                self.run_dir / "checkpoints", c.resume, c.resume_fallback, self.model,
                self.optimizer, self.mcfg, log=log,
            )  # fmt: skip
            if found is None:  # step 0: an earlier run's history is refused, or archived
                rundir.fresh_start(self.run_dir, self.cfg.logging.existing, c.resume, log=log)
        except ckpt.CheckpointError as e:  # the same verdict on every rank
            from megatron_agpo.launcher import refused_exit

            if self.rank == 0:
                print(f"agpo-train: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(refused_exit(2, self.rank)) from None
        self._saved_step = self.step
        if found is None:
            return
        path, state = found
        self.step, self.version = state["step"], state["version"]
        self.data.load_state_dict(state["data"])
        # Overlapped runs store the oldest untrained batch's stream position (else: the step).
        self._stream_start = state.get("stream", self.step)
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self._saved_step = self.step
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> Path:
        state = {
            "step": self.step,
            "version": self.version,
            "data": self.data.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.stream is not None:
            # In-flight rollouts are dropped: the resumed run generates them again from here.
            state["stream"], state["data"] = self.stream.position()
        path = ckpt.save(
            self.run_dir / "checkpoints",
            self.step,
            self.model,
            self.optimizer,
            state,
            self.cfg.checkpoint.keep_last,
            mcfg=self.mcfg,
            hf_dir=self.policy_dir,
        )
        self._saved_step = self.step
        return path

    # ----------------------------------------------------------------- the step
    def train_step(self) -> dict:
        """One RL step, the stages of docs/TRAINING.md in order."""
        cfg, t = self.cfg, Timer(cuda=self.device.type == "cuda")
        wall0 = time.perf_counter()
        scored, sampling = self.collect(t)  # 1-4: rollout, reward, broadcast, advantages
        batch, minis = self.token_batch(scored)  # this rank's rows, on the model's device
        with t("logprob"):
            self.fill_logprobs(batch)  # 5: old (and reference) log-probs
        sampling.update(self._importance_stats(batch))
        with t("update"):
            metrics, updated = self.update(batch, minis)  # 6-7: optimizer steps, inf/NaN skips
        self._last_updated = bool(updated)
        if self.skipped_in_row >= cfg.trainer.max_skipped_steps:
            raise FloatingPointError(
                f"{self.skipped_in_row} consecutive updates skipped for non-finite gradients"
            )
        self.step += 1
        if self.stream is not None:  # the batches this step took are trained now
            self.stream.commit()
        if updated and self.background_sync:  # 8, beside the next step's first stages
            with t("rollout"):  # rank 0: the next step's batch, before the engine is busy
                self._prefetch_next_batch()
            with t("sync"):
                self._start_background_sync(self.version + 1)
        elif updated:
            with t("sync"):
                self.sync_weights(self.version + 1)  # 8: the engine gets the new weights
        row = {**self._step_metrics(scored, batch, metrics, t, updated), **sampling}
        return {**row, **self._overlap_metrics(scored, t, time.perf_counter() - wall0)}

    def _importance_stats(self, batch: TokenBatch) -> dict:
        """The behaviour importance weight (proximal = old log-probs / behaviour = the
        engine's) over this rank's loss tokens: mean, max, share truncated or masked."""
        from megatron_agpo.algorithms import importance_weight_stats

        if batch.old_logp is None or batch.rollout_logp is None:
            return {}
        return importance_weight_stats(
            batch.old_logp.detach(), batch.rollout_logp, batch.loss_mask, self.cfg.algorithm.loss
        )

    def _overlap_metrics(self, scored: ScoredRollouts, t: Timer, wall: float) -> dict:
        """Rank 0: trainer and replica idle time, end-to-end tokens/s, and (overlapped runs)
        the staleness histogram and the share of tokens per version."""
        if self.rank != 0:
            return {}
        secs = t.seconds
        tokens = float((scored.prompt_lens + scored.response_lens).sum())
        out = {
            "time/step_wall": wall,
            "tokens_per_s_e2e": tokens / wall if wall > 0 else 0.0,
            # Waiting on the engine for samples (the rollout stage's time).
            "time/trainer_idle": secs.get("rollout", 0.0),
            # Rank 0 inside the engine's weight update: the transfer, and (rollout.partial=
            # finish) waiting for the replicas to finish the responses in flight.
            "time/sync_wait": self._sync_wait_s,
        }
        if self.background_sync:  # the sync(s) joined since the last row
            out["time/sync_background"] = self._sync_background_s
            out["time/sync_exposed"] = self._sync_exposed_s
        self._sync_wait_s = self._sync_exposed_s = self._sync_background_s = 0.0
        idle = getattr(self.engine, "replica_idle_s", None)
        if idle is not None:
            seen = self._idle_seen or [0.0] * len(idle)
            out["time/replica_idle"] = sum(a - b for a, b in zip(idle, seen, strict=True)) / max(
                len(idle), 1
            )
            self._idle_seen = list(idle)
        if self.stream is not None:
            from megatron_agpo.trainer.overlap import staleness_metrics

            tv = scored.token_versions
            if tv is None:
                tv = torch.full_like(scored.response_tokens, scored.weight_version)
            # The version the update trained at: the step's own (self.version has moved on).
            trained_at = self.version - int(self._last_updated)
            out.update(staleness_metrics(tv, scored.sample_versions(), trained_at,
                                         self.stream.k))  # fmt: skip
            out["staleness/dropped_total"] = float(self.stream.dropped_total)
        return out

    def generate(self, prompts, n: int, step_seed: int, round_: int = 0):
        """Rank 0: n sampled responses per prompt (a `RolloutBatch`, group order); None
        elsewhere. Seeds are fixed by (run, step, round, prompt)."""
        if self.rank != 0:
            return None
        reqs = self._requests(prompts, n, step_seed, round_)

        def rollout():
            self.engine.wake_up()  # no-op unless the engine sleeps between rollouts (CUDA)
            return self.engine.generate(reqs, expected_version=self.version)

        return self._engine_call(rollout)  # None once the engine failed

    def _requests(self, prompts, n: int, step_seed: int, round_: int = 0) -> list:
        """The engine requests of `prompts`, n samples each, seeds fixed by (run, step,
        round, prompt)."""
        from megatron_agpo.rollout.types import RolloutRequest

        r = self.cfg.rollout
        return [
            RolloutRequest(
                ex.prompt_ids,
                n=n,
                temperature=r.temperature,
                top_p=r.top_p,
                max_new_tokens=r.max_new_tokens,
                seed=sampling_seed(self.cfg.trainer.seed, step_seed, i, round_),
            )
            for i, ex in enumerate(prompts)
        ]

    def _submit(self, prompts, index: int) -> int | None:
        """Rank 0: start sampling a stream batch (overlapped generation; seeds keyed by its
        stream position); the engine's ticket, or None (elsewhere, or the engine failed)."""
        if self.rank != 0:
            return None
        reqs = self._requests(prompts, self.cfg.rollout.n, index)
        return self._engine_call(self.engine.submit, reqs, self.cfg.rollout.partial)

    def _stream_next(self, t: Timer) -> tuple[list, object]:
        """The stream's oldest batch (prompts on every rank, samples on rank 0), after
        topping the stream up to k + 1 batches in flight. Rank 0 waits for it (the trainer's
        idle time, in time/rollout) and drops the groups past the staleness bound; a batch
        left empty is sampled again at the current version (synchronously)."""
        from megatron_agpo.trainer.overlap import drop_stale

        st, n = self.stream, self.cfg.rollout.n
        with t("rollout"):
            st.top_up(self._submit, self.version, most=self.cfg.trainer.steps - self.step)
            p = st.head()
            samples = None
            if self.rank == 0:
                if p.samples is not None:  # collected before the background sync started
                    samples, p.samples = p.samples, None
                else:
                    self._join_sync()  # a background sync may still be submitting this batch
                    if p.ticket is not None:
                        samples = self._engine_call(self.engine.collect, p.ticket)
                if samples is not None:
                    samples, dropped = drop_stale(samples, self.version, st.k, n)
                    st.dropped_total += dropped
                    self._stream_dropped += dropped
                    if samples is None:
                        samples = self.generate(p.prompts, n, p.index)
        return p.prompts, samples

    def _engine_call(self, fn, *args):
        """Rank 0: fn(*args) on the rollout engine, or None once the engine has failed (a
        replica died, its heartbeat stopped, the pool is unusable). The failure is recorded,
        not raised: only rank 0 talks to the engine, so it reaches every rank through the next
        broadcast of scored rollouts, and every rank stops there together (`run`). A
        background weight sync still running owns the engine: it is joined first."""
        self._join_sync()
        if self._engine_failure is not None:
            return None
        try:
            return fn(*args)
        except (RolloutError, StaleWeightsError) as e:
            self._engine_failure = failure_line(e)
            return None

    def score(self, prompts, batch, n: int) -> ScoredRollouts | None:
        """Rank 0: the reward of every sample; None elsewhere (and once the engine failed)."""
        if self.rank != 0 or batch is None:
            return None
        samples = batch.samples
        truths = [prompts[s.prompt_id].ground_truth for s in samples]
        texts = [s.text for s in samples]
        rewards = self.reward.score_batch(texts, truths)
        # NaN: an answer the verifier could not score; its group leaves the batch (counted).
        keep = scored_groups(rewards, n)
        if len(keep) < len(samples):
            if not keep:
                raise RewardUnavailable(
                    f"reward: no group of this batch could be scored completely "
                    f"({sum(r != r for r in rewards)} of {len(rewards)} answers unscored)"
                )
            samples, rewards = [samples[i] for i in keep], [rewards[i] for i in keep]
        out = ScoredRollouts.from_lists(
            [s.prompt_token_ids for s in samples],
            [s.response_token_ids for s in samples],
            [s.logprobs for s in samples],
            [s.truncated for s in samples],
            rewards,
            batch.weight_version,
            n,
        )
        if self.cfg.model.router_replay == "rollout":
            out.set_routes([s.routed_experts for s in samples])
        if any(s.token_versions or s.weight_version != batch.weight_version for s in samples):
            # Overlapped generation: each token's version (rank 0: staleness metrics).
            versions = [v for s in samples for v in s.versions()]
            out.token_versions = torch.tensor(versions, dtype=torch.int64, device="cpu")
        return out

    def collect(self, t: Timer) -> tuple[ScoredRollouts, dict]:
        """data.prompts_per_step scored groups with their advantages, and sampling counters.

        With dynamic sampling, groups without signal are dropped and more prompts sampled, up to
        trainer.max_sampling_rounds batches; advantages are per group, so concatenating the
        kept groups of several rounds changes none of them, and REINFORCE++'s whitening runs
        once, over the kept batch.
        """
        cfg, n = self.cfg, self.cfg.rollout.n
        rule, want = cfg.trainer.dynamic_sampling, cfg.data.prompts_per_step
        kept: list[ScoredRollouts] = []
        stats, sampled_sum, groups = {"groups/sampled": 0, "sampling/rounds": 0}, 0.0, 0
        rounds = 1 if rule == "off" else cfg.trainer.max_sampling_rounds
        adv_cfg = cfg.algorithm.advantage_config()
        data_state = self.data.state_dict()  # a failed rollout rewinds the step's prompts
        self._stream_dropped = 0
        for rnd in range(rounds):
            if self.stream is not None:  # overlapped: refills come from the stream too
                prompts, samples = self._stream_next(t)
            else:
                prompts = self.data.next_batch()
                with t("rollout"):
                    samples = self.generate(prompts, n, self.step, rnd)
            with t("reward"):
                scored = self.score(prompts, samples, n)
            try:
                scored = broadcast_scored(scored, self.device, failure=self._engine_failure)
            except RolloutFailed:  # every rank: nothing of this step is trained, or consumed
                # (overlapped: the checkpoint stores the stream's position, that of the first
                # batch this step took, whatever round failed)
                self.data.load_state_dict(data_state)
                raise
            if self.stream is not None:
                self.stream.pop()  # trained from here on: past the checkpoint's position
            # Per group here; REINFORCE++'s batch whitening waits for the kept batch (below),
            # so it never depends on how many groups a round dropped.
            scored.advantages = compute_advantages(scored.rewards, n, adv_cfg, batch_norm=False)
            rows = torch.arange(len(scored), device="cpu")
            if rule != "off":
                keep = informative_groups(scored.rewards, scored.advantages, n, rule)
                rows = group_rows(keep, n)
            rows = rows[: (want - groups) * n]  # never more than the step needs
            kept.append(scored.select(rows))
            groups += len(rows) // n
            stats["groups/sampled"] += scored.num_groups
            sampled_sum += float(scored.rewards.sum())
            stats["sampling/rounds"] += 1
            if groups >= want:
                break
        stats["groups/kept"] = groups
        # Before the group filter (reward/mean is over the kept groups only).
        stats["reward/mean_sampled"] = sampled_sum / (stats["groups/sampled"] * n)
        if self.stream is not None:
            stats["staleness/dropped"] = self._stream_dropped
        elif self.rank == 0:
            # Colocated on CUDA: free the KV cache and offload the weights while the trainer
            # works; the next sync (or rollout) wakes the engine. A no-op elsewhere. (Not
            # under overlap: the replicas keep generating.)
            self._engine_call(self.engine.sleep)
        if not groups:
            raise RuntimeError(
                f"dynamic sampling ({rule}) kept no group in {rounds} rounds of {want} prompts: "
                "every group had identical rewards / zero advantages; raise "
                "trainer.max_sampling_rounds or use an easier/harder prompt set"
            )
        out = ScoredRollouts.concat(kept)
        if adv_cfg.batch_norm:
            out.advantages = whiten(out.advantages, n, adv_cfg)
        return out, stats

    def token_batch(self, scored: ScoredRollouts) -> tuple[TokenBatch, list[range]]:
        """This data-parallel rank's rows as token tensors on the model's device, and the
        mini-batches as ranges of them, with their aggregation weights.

        The batch's rows split into trainer.mini_batches contiguous mini-batches (as the
        optimizer steps see them); each mini-batch's rows are shared over the DP ranks
        balanced by token count, and each rank builds only its share. Aggregation weights
        normalise over the whole mini-batch (every rank knows every row's length), so the
        gradient equals DP=1's. DAPO's overlong filter (when on) takes truncated rows out of
        the loss."""
        cfg = self.cfg
        dp_size, dp_rank = dp_size_and_rank()
        seq_lens = (scored.prompt_lens + scored.response_lens).tolist()  # host bookkeeping
        cut = scored.truncated.tolist() if cfg.trainer.overlong_filter else [False] * len(seq_lens)
        loss_lens = [0 if c else r for c, r in zip(cut, scored.response_lens.tolist(), strict=True)]
        mine, cut_mine, minis, weights, self._mini_sizes = [], [], [], [], []
        for rows in torch.arange(len(scored), device="cpu").tensor_split(cfg.trainer.mini_batches):
            rows = rows.tolist()
            self._mini_sizes.append(len(rows))
            share = balanced_partition([seq_lens[i] for i in rows], dp_size)[dp_rank]
            scale = row_scales([loss_lens[i] for i in rows], cfg.algorithm.loss.agg_mode,
                               self.norm_constant)  # fmt: skip
            phantom = rows and not share
            if phantom:
                # Fewer rows than DP ranks: this rank runs one row with no loss token, so it
                # still joins the step's collectives (DDP's gradient reduction).
                share, scale = [0], torch.zeros(len(rows), device="cpu")
            minis.append(range(len(mine), len(mine) + len(share)))
            mine += [rows[i] for i in share]
            cut_mine += [phantom or cut[rows[i]] for i in share]
            weights.append(scale[share])
        local = scored.select(torch.tensor(mine, dtype=torch.long, device="cpu"))
        batch = build_token_batch(
            local.prompt_tokens, local.prompt_lens.tolist(), local.response_tokens,
            local.response_lens.tolist(), local.rollout_logp, local.advantages,
            self.tokenizer.pad_token_id, pad_multiple=self.seq_multiple, truncated=cut_mine,
            routes=local.routes,
        )  # fmt: skip
        w = torch.cat(weights) if weights else torch.zeros(0, device="cpu")
        batch.agg_weights = batch.loss_mask * w.to(batch.loss_mask.dtype)[:, None]
        return batch.to(self.device), minis

    def fill_logprobs(self, batch: TokenBatch) -> None:
        """Old log-probs (recomputed by the trainer, or the engine's) and, with a KL term, the
        reference model's; each data-parallel rank computes its shard of the rows."""
        tr, loss = self.cfg.trainer, self.cfg.algorithm.loss
        args = (self.step_shape, self.vocab_size, loss.fuse_output_layer, False, loss.producer)
        batch.old_logp = (
            compute_logp(self.model, batch, *args)
            if tr.old_logp == "recompute"
            else batch.rollout_logp
        )
        if self.ref_model is not None:
            batch.ref_logp = compute_logp(self.ref_model, batch, *args)

    def update(self, batch: TokenBatch, minis: list[range]) -> tuple[dict, bool]:
        """trainer.ppo_epochs passes of trainer.mini_batches optimizer steps over the batch
        (this rank's rows of each mini-batch, `minis`); returns the last update's metrics
        and whether any update was applied. The metrics stay on the device until the step
        logs them (one host copy)."""
        loss_cfg = self.cfg.algorithm.loss
        last, extra, updated = None, {}, False
        moe: dict[str, float] = {}  # MoE: the load-balancing loss over the step's forwards
        with tracked_aux_losses(self.model, self.mcfg.num_layers, moe):
            last, extra, updated = self._updates(batch, minis, loss_cfg)
        return {**({} if last is None else last.to_dict()), **extra, **moe}, updated

    def _updates(self, batch: TokenBatch, minis: list[range], loss_cfg):
        last, extra, updated = None, {}, False
        for _ in range(self.cfg.trainer.ppo_epochs):
            for k, rows in enumerate(minis):
                if not self._mini_sizes[k]:  # a short dynamic-sampling batch
                    continue
                mini = batch.select(list(rows))
                self.model.zero_grad_buffer()
                self.optimizer.zero_grad()
                last = forward_backward(
                    self.model, mini, loss_cfg, self.step_shape, self.vocab_size
                )
                # Host decision: skip the update or not (the same answer on every rank).
                if not grads_are_finite(self.model):
                    self.skipped_in_row += 1
                    continue
                extra = {"lr": self.optimizer.param_groups[0]["lr"]}  # this update's
                self._join_sync()  # the background sync reads the weights this step changes
                ok, grad_norm, _ = self.optimizer.step()  # megatron reads its grad norm
                self.scheduler.step(1)
                updated |= bool(ok)
                extra["grad_norm"] = float(grad_norm or 0.0)
                self.skipped_in_row = 0
        return last, extra, updated  # `update` makes the metrics' one host copy

    def sync_weights(self, version: int) -> None:
        """Collective: stream the sharded policy (TP shards, PP stages) as HF tensors into the
        engine on rank 0."""
        from megatron_agpo.models import gather_hf_tensors_to_rank0

        tensors = gather_hf_tensors_to_rank0(self.model, self.mcfg)
        if self.rank == 0:
            # A failed engine (now or earlier) is recorded for the next broadcast (`collect`).
            t0 = time.perf_counter()
            self._engine_call(self.engine.update_weights, tensors, version)
            self._sync_wait_s += time.perf_counter() - t0
        # The rest of the gather (all of it elsewhere, what a failed sync left on rank 0): TP
        # all-gathers, and sends from later pipeline stages.
        for _ in tensors:
            pass
        self.version = version

    def _prefetch_next_batch(self) -> None:
        """Rank 0, before a background sync: collect the stream's oldest batch (the next
        step's), so that step needs the engine for nothing while the sync owns it. Under
        rollout.partial=finish the engine would finish that batch before loading the new
        weights anyway: nothing waits longer than it did."""
        st = self.stream
        if self.rank != 0 or not st.pending:
            return
        p = st.head()
        if p.ticket is not None and p.samples is None:
            p.samples = self._engine_call(self.engine.collect, p.ticket)
            p.ticket = None

    def _start_background_sync(self, version: int) -> None:
        """Collective: start the weight sync to `version` in its thread (`BackgroundSync`),
        having drawn the batches the stream submits next (every rank draws the same prompts);
        rank 0's thread submits them once the engine holds `version`, as `top_up` would at
        the start of the next step. The trainer's weights are `version` from here on."""
        from megatron_agpo.models import gather_hf_tensors_to_rank0
        from megatron_agpo.trainer.overlap import BackgroundSync

        self._join_sync()
        steps_left = self.cfg.trainer.steps - self.step
        new = self.stream.draw(version, steps_left) if steps_left > 0 else []
        rank0, engine, failed = self.rank == 0, self.engine, self._engine_failure
        n = self.cfg.rollout.n
        submits = [(p, self._requests(p.prompts, n, p.index)) for p in new] if rank0 else []
        partial, model, mcfg, groups = (self.cfg.rollout.partial, self.model, self.mcfg,
                                        self._gather_groups)  # fmt: skip

        def work() -> tuple[str | None, float]:  # in the sync's thread: of the trainer's
            # state it writes only the drawn batches' tickets, read after the join
            tensors = gather_hf_tensors_to_rank0(model, mcfg, groups)
            failure, t0 = None, time.perf_counter()
            try:
                if rank0 and failed is None:
                    engine.update_weights(tensors, version)
                    for p, requests in submits:
                        p.ticket = engine.submit(requests, partial)
            except (RolloutError, StaleWeightsError) as e:
                failure = failure_line(e)
            finally:  # the rest of the gather (all of it elsewhere): the other ranks' match
                seconds = time.perf_counter() - t0
                for _ in tensors:
                    pass
            return failure, seconds

        self._bg = BackgroundSync(work, self.device)
        self.version = version

    def _join_sync(self) -> None:
        """Wait for the background weight sync, if one runs; its failure (rank 0) is the
        engine's from here on (the next broadcast of scored rollouts carries it)."""
        bg, self._bg = self._bg, None
        if bg is None:
            return
        self._sync_exposed_s += bg.join()
        self._sync_background_s += bg.seconds
        self._sync_wait_s += bg.engine_seconds
        if bg.failure is not None and self._engine_failure is None:
            self._engine_failure = bg.failure

    def _step_metrics(
        self, scored: ScoredRollouts, batch: TokenBatch, m: dict, t: Timer, updated: bool
    ) -> dict:
        n = scored.group_size
        tau = self.cfg.algorithm.advantage_config().tau
        lengths = scored.response_lengths
        groups = scored.advantages.view(-1, n)
        truncated = float(scored.truncated.double().mean())
        row = {
            "step": self.step,
            "weight_version": self.version,
            "reward/mean": float(scored.rewards.mean()),
            "reward/pass_rate": float((scored.rewards > tau).double().mean()),
            "reward/timeouts": self.reward.stats().timeouts if self.reward else 0,
            "response/len_mean": float(lengths.mean()),
            "response/len_max": float(lengths.max()),
            "response/truncated": truncated,
            "groups/zero_advantage": float((groups == 0).all(dim=1).double().mean()),
            "loss": m.get("all/loss", float("nan")),
            "updated": int(updated),
            **m,
            **{f"time/{k}": v for k, v in t.seconds.items()},
        }
        total = sum(t.seconds.values())
        # Tokens the step processed (prompt + response, padding excluded) per second of it.
        row["tokens_per_s"] = float((scored.prompt_lens + scored.response_lens).sum()) / total
        if self.cfg.trainer.overlong_filter:
            row["response/overlong_filtered"] = truncated
        return row

    # ----------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        """pass@k on held-out prompts with fixed seeds (comparable across steps)."""
        from megatron_agpo.eval import pass_at_k_curve

        n = self.cfg.trainer.eval_n
        samples = self.generate(self.eval_prompts, n, step_seed=-1)
        scored = self.score(self.eval_prompts, samples, n)
        scored = broadcast_scored(scored, self.device, failure=self._engine_failure)
        r = scored.rewards.view(-1, n)
        tau = self.cfg.algorithm.advantage_config().tau
        counts = [(n, int((g > tau).sum())) for g in r]
        return {f"eval/pass@{k}": v for k, v in pass_at_k_curve(counts).items()}

    # ----------------------------------------------------------------- run
    def run(self) -> dict:
        """Train to trainer.steps; the last step's metrics. A rollout engine failure stops
        every rank at the same point with an emergency checkpoint (`_rollout_failed`)."""
        try:
            return self._run()
        except RolloutFailed as e:
            self._rollout_failed(e)

    def _run(self) -> dict:
        cfg = self.cfg
        if self.preemption.should_stop(0.0):  # signalled while starting (collective)
            self._preempted_at_start()
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
            self.metrics.write(
                f"AGPO run: {self.policy_dir} | {len(self.train_prompts)} train / "
                f"{len(self.eval_prompts)} held-out prompts | prompts filtered as too long: "
                f"{self.prompt_stats['too_long']} | world {dist.get_world_size()} "
                f"(TP={cfg.parallel.tensor_parallel}, PP={cfg.parallel.pipeline_parallel}, "
                f"DP={cfg.parallel.data_parallel(dist.get_world_size())}) | "
                f"engine: {cfg.rollout.mode}"
            )
        every = cfg.trainer.eval_every
        if self.step == 0 and every:
            self._log_eval()
        last = {}
        while self.step < cfg.trainer.steps:
            t0 = time.perf_counter()
            row = self.train_step()
            if every and self.step % every == 0:
                try:
                    row.update(self.evaluate())
                except RolloutFailed:  # the step itself completed: its metrics are kept
                    if self.rank == 0:
                        self.metrics.log({**row, **reward_counters(self.reward.stats())})
                    raise
            if self.rank == 0:
                row.update(reward_counters(self.reward.stats()))
                self.metrics.log(row)
            last = row
            if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                self.save()
            # One all-reduce per step: every rank stops after the same step.
            if self.preemption.should_stop(time.perf_counter() - t0):
                path = self.save() if self._saved_step != self.step else None
                path = path or ckpt.step_dir(self.run_dir / "checkpoints", self.step)
                if self.rank == 0:
                    from megatron_agpo.launcher import write_exit_status

                    write_exit_status(ckpt.EXIT_PREEMPTED, step=self.step, path=str(path))
                    print(f"preempted ({self.preemption.describe()}): saved {path} at step "
                          f"{self.step}; exit {ckpt.EXIT_PREEMPTED}", flush=True)  # fmt: skip
                raise ckpt.Preempted()
        self._join_sync()  # the last step's weight sync (its failure is reported below)
        # A rerun of a finished run (or a resume at the last step) saves nothing again.
        if cfg.checkpoint.save_final and self._saved_step != self.step:
            self.save()
        if self.rank == 0:
            if self._engine_failure:  # the last weight sync failed: nothing left to roll out
                self.metrics.write(f"warning: rollout engine failed after the last step: "
                                   f"{self._engine_failure}")  # fmt: skip
            plot = plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
            self.metrics.write(f"done: metrics {self.run_dir / 'metrics.jsonl'}, plot {plot}")
        return last

    def _rollout_failed(self, failure: RolloutFailed) -> None:
        """Every rank, after the same broadcast: the rollout engine failed (rank 0's message).
        Nothing of the step in progress was trained and its prompts are not consumed; the last
        completed step is saved (checkpoint.save_on_failure, collective) unless it already is,
        and the run exits RolloutFailed.EXIT_CODE (69) with one line on rank 0."""
        from megatron_agpo.launcher import refused_exit, write_exit_status

        code, c = RolloutFailed.EXIT_CODE, self.cfg.checkpoint
        path = None
        if self._saved_step != self.step and c.save_on_failure:
            path = self.save()
        elif self._saved_step == self.step and self.step:
            path = ckpt.step_dir(self.run_dir / "checkpoints", self.step)
        # Under agpo-train every rank exits 0 and the launcher exits 69 (no torchrun traceback).
        exit_code = refused_exit(code, self.rank)
        if self.rank == 0:
            if path is not None:
                how = "the same command" if c.resume == "auto" else "checkpoint.resume=auto"
                what = f"checkpoint {path} (step {self.step}); resume with {how}"
            elif not self.step:
                what = "no step completed: nothing to save"
            else:
                last = f"step {self._saved_step}" if self._saved_step else "none"
                what = (
                    f"not saved (checkpoint.save_on_failure=false): steps {self._saved_step + 1}"
                    f"-{self.step} are lost; last checkpoint: {last}"
                )
            logs = ""
            if self.cfg.rollout.mode == "replicas":
                logs = f" (replica logs: {self.run_dir / 'replica_logs'})"
            write_exit_status(code, step=self.step, path=None if path is None else str(path))
            at = f"after step {self.step}" if self.step else "before the first step"
            print(f"agpo-train: error: rollout engine failed {at}: {failure}{logs}; {what}; "
                  f"exit {code}", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(exit_code) from None

    def _preempted_at_start(self) -> None:
        """A preemption signal (or the job's end) before the first step: nothing was trained
        since the last checkpoint, so nothing is saved; exit 75 all the same (requeue)."""
        if self.rank == 0:
            from megatron_agpo.launcher import write_exit_status

            last = f"the checkpoint of step {self.step} is current" if self.step else "no step ran"
            write_exit_status(ckpt.EXIT_PREEMPTED, step=self.step, path=None)
            print(f"preempted ({self.preemption.describe()}) before the first step: nothing to "
                  f"save ({last}); exit {ckpt.EXIT_PREEMPTED}", flush=True)  # fmt: skip
        raise ckpt.Preempted()

    def _log_eval(self) -> None:
        row = {"step": self.step, **self.evaluate()}
        if self.rank == 0:
            self.metrics.log(row, step_done=False)
            self.metrics.write(
                "base policy: "
                + ", ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in row.items() if k != "step")
            )

    def close(self) -> None:
        from megatron_agpo.parallel import destroy_parallel

        if getattr(self, "preemption", None) is not None:
            self.preemption.uninstall()
        try:  # a stop in the middle of a step: the sync's thread must end before its engine
            self._join_sync()
        except Exception as e:  # noqa: BLE001 - the run already ends with its own error
            if self.rank == 0:
                print(f"weight sync in the background failed: {e}", file=sys.stderr, flush=True)
        if self.engine is not None:
            self.engine.close()
        if self.reward is not None:
            self.reward.close()
        if self.metrics is not None:
            self.metrics.close()
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
        destroy_parallel()
