"""pass@k of a checkpoint on the math benchmarks: see megatron_agpo/eval/cli.py and docs/EVAL.md."""

import sys

from megatron_agpo.eval.cli import main

if __name__ == "__main__":  # vLLM starts its workers with spawn: the guard is required
    sys.exit(main())
