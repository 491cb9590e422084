#!/bin/bash
# AGPO on a Llama-3-70B-class model: 8 training nodes (TP4 x PP4 x DP4 over 64 GPUs, the
# NeMo-RL 70B layout) and 4 rollout nodes each running one vLLM replica (TP8) as its own srun
# step, connected to the trainer over an authenticated channel.
#
#   sbatch slurm/agpo_70b.sh model.hf_path=/models/Llama-3.3-70B-Instruct \
#       data=math_jsonl data.path=/data/math_train.jsonl
#   bash slurm/agpo_70b.sh --dry-run            # the layout and commands, launches nothing
#
# Partition, account, QOS and container flags are the cluster's: add them on the sbatch line
# (sbatch -p gpu -A myproject ...). Preemption: SLURM sends USR1 10 minutes before the time
# limit; the trainer saves and the job requeues itself and resumes. docs/SLURM.md has the rest.
#SBATCH --job-name=agpo-70b
#SBATCH --nodes=12
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=agpo-70b-%j.out
set -uo pipefail

# Under sbatch, $0 is a copy in slurmd's spool: the controller knows the submitted path.
AGPO_JOB_SCRIPT=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null |
    grep -o 'Command=[^ ]*' | cut -d= -f2)
AGPO_JOB_SCRIPT=${AGPO_JOB_SCRIPT:-$0}
AGPO_ROOT=${AGPO_ROOT:-$(cd "$(dirname "$AGPO_JOB_SCRIPT")/.." && pwd)}
# shellcheck source=common.sh
source "$AGPO_ROOT/slurm/common.sh" || exit 2

ROLLOUT_NODES=${ROLLOUT_NODES:-4}
ROLLOUT_TP=${ROLLOUT_TP:-8}
AGPO_TP=${AGPO_TP:-4}
AGPO_PP=${AGPO_PP:-4}
JOB_OVERRIDES=(
    model=llama3_70b
    "parallel.tensor_parallel=$AGPO_TP"
    "parallel.pipeline_parallel=$AGPO_PP"
    "rollout.engine.tensor_parallel_size=$ROLLOUT_TP"
    # Save every 10 steps besides the save on preemption: a node failure loses at most 10.
    checkpoint.save_every=10
)
agpo_main "$@"
