"""pass@k evaluation: the unbiased estimator, benchmark loaders, a resumable sampling driver
and results reports. Nothing here imports vLLM or the trainer; the CLI (cli.py) does, lazily.
"""

from megatron_agpo.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkSpec,
    EvalProblem,
    canonical_name,
    last_boxed,
    load_benchmark,
)
from megatron_agpo.eval.driver import (
    GenerateFn,
    ScoreBatchFn,
    ScoreFn,
    default_prompt,
    evaluate,
    problem_seed,
    read_results_file,
)
from megatron_agpo.eval.passk import default_ks, pass_at_k, pass_at_k_array, pass_at_k_curve
from megatron_agpo.eval.results import (
    ProblemResult,
    group_by_benchmark,
    markdown_table,
    plot_curves,
    summarize,
    write_results,
)

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "EvalProblem",
    "GenerateFn",
    "ProblemResult",
    "ScoreBatchFn",
    "ScoreFn",
    "canonical_name",
    "default_ks",
    "default_prompt",
    "evaluate",
    "group_by_benchmark",
    "last_boxed",
    "load_benchmark",
    "markdown_table",
    "pass_at_k",
    "pass_at_k_array",
    "pass_at_k_curve",
    "plot_curves",
    "problem_seed",
    "read_results_file",
    "summarize",
    "write_results",
]
