#!/bin/bash
# The CPU default run under SLURM: the tiny Llama, 2 training ranks over gloo (TP=2) and one
# vLLM replica as its own job step, on one node. `sbatch slurm/agpo_tiny.sh trainer.steps=2`; `--dry-run` prints.
#SBATCH --job-name=agpo-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=agpo-tiny-%j.out
set -uo pipefail

AGPO_JOB_SCRIPT=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null |
    grep -o 'Command=[^ ]*' | cut -d= -f2)
AGPO_JOB_SCRIPT=${AGPO_JOB_SCRIPT:-$0}
AGPO_ROOT=${AGPO_ROOT:-$(cd "$(dirname "$AGPO_JOB_SCRIPT")/.." && pwd)}
# shellcheck source=common.sh
source "$AGPO_ROOT/slurm/common.sh" || exit 2

# One thread per rank: the two ranks and the replica share the node's cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# vLLM-CPU's KV cache (GiB) in the replica step; its default takes a large share of memory.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# The replica is its own job step on the same node, connected like a 70B job's replicas.
ROLLOUT_LAUNCH=${ROLLOUT_LAUNCH:-external}
JOB_OVERRIDES=()
agpo_main "$@"
