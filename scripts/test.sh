#!/usr/bin/env bash
# The project's test command (README and CI). Extra arguments go to pytest.
#   scripts/test.sh                 # the CI tiers: unit + dist (+ slow tests that fit)
#   scripts/test.sh -m unit         # fast tier only
#   AGPO_TEST_WORKERS=0 scripts/test.sh   # one process (default: 2 pytest-xdist workers)
# With workers, tests that share a trainer run or an engine (module- or session-scoped
# fixtures), the SLURM tests and the memory-heavy (`bigmem`) tests run on one worker each
# (tests/conftest.py groups them for --dist loadgroup), costly tiers first. Two workers on the
# 2-core CI machine: the README gives the times measured both ways. The whole suite (no -m,
# -k or test path given) runs the `bigmem` tests after the others, with only the unit tier
# beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
workers=${AGPO_TEST_WORKERS:-2}
xdist=()
if [[ $workers != 0 ]]; then
    if .venv/bin/python -c "import xdist" 2>/dev/null; then
        xdist=(-n "$workers" --dist loadgroup)
        # Idle OpenMP threads sleep instead of spinning: a 2-thread process (the warm start,
        # the SmolLM2 example) beside another worker's processes otherwise spins on a
        # descheduled thread at every parallel region (a 2-thread loop of small layers with
        # tests beside it: 39.5 s spinning, 1.7 s passive; alone, passive costs it 0.3 -> 0.8 s,
        # hence only with workers). Bit-identical: it changes how idle threads wait, not how
        # work is split.
        export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    else
        echo "test.sh: pytest-xdist is not installed (scripts/setup.sh installs it): one process"
    fi
fi
pytest() { .venv/bin/python -m pytest --timeout=1200 "$@"; }
# 5 = no test collected (e.g. a marker selection that matches nothing here): not a failure.
ok() { [[ $1 -eq 0 || $1 -eq 5 ]]; }
selects=0
for a in "$@"; do
    [[ $a == -m* || $a == -k* || -e ${a%%::*} ]] && selects=1
done
if [[ ${#xdist[@]} -gt 0 && $selects == 0 ]]; then
    # The whole suite in two phases. First every test with processes, engines or subprocesses
    # (all but `unit` and `bigmem`) on the workers. Then the memory-heavy tests (`bigmem`) with
    # only the `unit` tier beside them, in a process of its own: beside another worker's
    # trainer run the SmolLM2 example's trainer (near 10 GB resident) was OOM-killed on the
    # 24 GB CI machine, while the unit tests (one thread, small tensors) fill the cores it
    # leaves idle (about 40% of two while it loads, converts and starts its engine).
    pytest -m "not gpu and not bigmem and not unit" "${xdist[@]}" "$@"
    rc=$?
    unit_log=$(mktemp)
    # (no cache plugin: two pytest processes would write .pytest_cache at once)
    pytest -m "not gpu and unit and not bigmem" -p no:cacheprovider "$@" >"$unit_log" 2>&1 &
    unit_pid=$!
    pytest -m "not gpu and bigmem" "$@"
    rc2=$?
    wait "$unit_pid"
    rc3=$?
    echo "test.sh: the unit tier, run beside the bigmem tests:"
    cat "$unit_log"
    rm -f "$unit_log"
    ok $rc && rc=$rc2
    ok $rc && rc=$rc3
else
    pytest -m "not gpu" "${xdist[@]}" "$@"
    rc=$?
fi
if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests for this selection"
    exit 0
fi
exit $rc
