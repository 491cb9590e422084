#!/bin/bash
# AGPO on Qwen3-30B-A3B (mixture of experts) with reasoning responses up to 8,192 tokens:
# 2 training nodes (TP4 x DP4 over 16 GPUs, the 128 experts split over EP8 inside each node)
# and 2 rollout nodes running 4 vLLM replicas (TP4) as their own srun steps, connected to the
# trainer over an authenticated channel. conf/model/qwen3_30b_a3b.yaml holds the run.
#
#   sbatch slurm/agpo_qwen3_30b_a3b.sh data=math_jsonl data.path=/data/math_train.jsonl
#   bash slurm/agpo_qwen3_30b_a3b.sh --dry-run    # the layout and commands, launches nothing
#
# Before anything starts, `python -m megatron_agpo.plan ... --check` sizes the layout (FITS:
# 74.5 of 79.6 GiB per GPU; AGPO_TP=2 does not). Partition, account, QOS and container flags
# are the cluster's: add them on the sbatch line. Preemption: USR1 10 minutes before the
# limit, save, requeue, resume.
#SBATCH --job-name=agpo-qwen3-30b-a3b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=agpo-qwen3-30b-a3b-%j.out
set -uo pipefail

# Under sbatch, $0 is a copy in slurmd's spool: the controller knows the submitted path.
AGPO_JOB_SCRIPT=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null |
    grep -o 'Command=[^ ]*' | cut -d= -f2)
AGPO_JOB_SCRIPT=${AGPO_JOB_SCRIPT:-$0}
AGPO_ROOT=${AGPO_ROOT:-$(cd "$(dirname "$AGPO_JOB_SCRIPT")/.." && pwd)}
# shellcheck source=common.sh
source "$AGPO_ROOT/slurm/common.sh" || exit 2

ROLLOUT_NODES=${ROLLOUT_NODES:-2}
ROLLOUT_TP=${ROLLOUT_TP:-4}
AGPO_TP=${AGPO_TP:-4}
AGPO_EP=${AGPO_EP:-8}
JOB_OVERRIDES=(
    model=qwen3_30b_a3b
    "parallel.tensor_parallel=$AGPO_TP"
    "parallel.expert_parallel=$AGPO_EP"
    "rollout.engine.tensor_parallel_size=$ROLLOUT_TP"
    checkpoint.save_every=10
)
agpo_main "$@"
