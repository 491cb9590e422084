#!/usr/bin/env bash
# The search-ads relevance example, end to end on CPU: synthetic data, a tiny annotator
# warm-started on a small labelled split, GRPO and AGPO annotators (3 seeds each, same steps),
# annotation of an unlabelled pool by every annotator (agpo-annotate), students trained on
# each annotator's labels, and the report. About 20 minutes on 2 cores; stages already done
# are skipped (rerun to resume). Arguments go to experiment.py: --smoke (CI: 2 RL steps),
# --out DIR, --docs docs/results (also update docs/results/relevance.md and its plots).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python examples/search_relevance/experiment.py "$@"
