#!/bin/bash
# AGPO on Qwen3-8B with reasoning responses up to 16,384 tokens: 2 training nodes (TP4 x CP2 x
# DP2 over 16 GPUs; context parallelism splits each 17,408-token sequence over two ranks) and
# 2 rollout nodes running 8 vLLM replicas (TP2) as their own srun steps, connected to the
# trainer over an authenticated channel. conf/model/qwen3_8b_16k.yaml holds the run.
#
#   sbatch slurm/agpo_qwen3_8b_16k.sh data=math_jsonl data.path=/data/math_train.jsonl
#   bash slurm/agpo_qwen3_8b_16k.sh --dry-run     # the layout and commands, launches nothing
#
# Before anything starts, `python -m megatron_agpo.plan ... --check` sizes the layout (FITS:
# 32.3 of 79.6 GiB per GPU) and agpo-train refuses context parallelism without Transformer
# Engine. Partition, account, QOS and container flags are the cluster's: add them on the
# sbatch line. Preemption: USR1 10 minutes before the limit, save, requeue, resume.
#SBATCH --job-name=agpo-qwen3-8b-16k
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=agpo-qwen3-8b-16k-%j.out
set -uo pipefail

# Under sbatch, $0 is a copy in slurmd's spool: the controller knows the submitted path.
AGPO_JOB_SCRIPT=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null |
    grep -o 'Command=[^ ]*' | cut -d= -f2)
AGPO_JOB_SCRIPT=${AGPO_JOB_SCRIPT:-$0}
AGPO_ROOT=${AGPO_ROOT:-$(cd "$(dirname "$AGPO_JOB_SCRIPT")/.." && pwd)}
# shellcheck source=common.sh
source "$AGPO_ROOT/slurm/common.sh" || exit 2

ROLLOUT_NODES=${ROLLOUT_NODES:-2}
ROLLOUT_TP=${ROLLOUT_TP:-2}
AGPO_TP=${AGPO_TP:-4}
AGPO_CP=${AGPO_CP:-2}
JOB_OVERRIDES=(
    model=qwen3_8b_16k
    "parallel.tensor_parallel=$AGPO_TP"
    "parallel.context_parallel=$AGPO_CP"
    "rollout.engine.tensor_parallel_size=$ROLLOUT_TP"
    checkpoint.save_every=10
)
agpo_main "$@"
