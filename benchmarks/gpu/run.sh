#!/usr/bin/env bash
# GPU check for qrm on ONE GPU (at most ~10 minutes on an H100): what only a GPU can show.
#   1. memory: bitsandbytes CUDA 4-bit training steps at the 8B recipe's real shapes (random init, no Hub), peak
#      memory against `qrm plan`, tokens/s                               (benchmarks/gpu_qlora_memory.py)
#   2. parity: packed + prefix-shared vs TRL's padded path (rewards, gradients, pairs/s) on the 1B recipe's shapes,
#      and flash-attn varlen packing when flash-attn is installed       (benchmarks/gpu/parity.py)
#   3. fsdp:   accelerate_configs/fsdp.yaml through `accelerate launch` on one GPU, the 8B FSDP recipe (bf16 storage)
#   4. summary: every step's status and seconds, memory vs plan, pairs/s ratio, MFU  (benchmarks/gpu/check.py)
# Writes benchmarks/results/*.json (file names carry the device name). A step that fails or runs out of its time
# is recorded as such and the next one runs.
#
#   benchmarks/gpu/run.sh              # on the GPU machine
#   benchmarks/gpu/run.sh --dry-run    # on CPU at tiny shapes, results in a temp dir (QRM_GPU_OUT): every step's
#                                      # code path; tests/test_gpu_bench_script.py runs it
#
# The GPU image has torch, transformers 5.17, accelerate and peft but not trl, bitsandbytes or datasets: wheels in
# .whl/ (git-ignored) are installed into /tmp/qrm-site when those are missing. Fetch them once, here, in the repo root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     transformers==5.23.0 trl==1.16.0 peft==0.21.2 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   zip -qd .whl/bitsandbytes-*.whl 'bitsandbytes/lib*_cuda1[12]*' 'bitsandbytes/lib*_rocm*' 'bitsandbytes/lib*_xpu*'
# (23 MiB; bitsandbytes keeps only its CUDA 13 kernels, for the image's torch 2.11+cu130). Device tool: carry
# [".whl"], command: `benchmarks/gpu/run.sh; cp benchmarks/results/* $OUT/`, timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import trl, bitsandbytes, datasets" 2>/dev/null; then
  [ -d .whl ] || { echo "run.sh: trl, bitsandbytes or datasets missing and no .whl/ to install them from" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qrm-site .whl/*.whl \
    || { echo "run.sh: installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/qrm-site:$PYTHONPATH"
  # datasets 5.2 and transformers 5.23 need pyarrow>=24, fsspec<=2026.9.0, regex>=2025.10.22: carry any that fail
  python3 -m pip list 2>/dev/null | grep -iE '^(pyarrow|fsspec|regex|tokenizers|huggingface.hub|accelerate|torch) '
fi
if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  OUT=${QRM_GPU_OUT:-$(mktemp -d -t qrm-gpu-dry-XXXX)}
  MEMORY_FLAGS=(--tiny) CHECK_FLAGS=(--dry-run) LIMITS=(120 120)
else
  OUT=${QRM_GPU_OUT:-benchmarks/results}
  MEMORY_FLAGS=(--steps 6 --max-length 1024) CHECK_FLAGS=() LIMITS=(330 200)
fi
mkdir -p "$OUT"
STEPS="$OUT/.gpu-check-steps.tsv"
: > "$STEPS"
step() {  # name, seconds allowed, command...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@"
  printf '%s\t%s\t%s\n' "$name" "$?" "$((SECONDS - t0))" >> "$STEPS"
}
step memory+parity "${LIMITS[0]}" python3 benchmarks/gpu/check.py --out-dir "$OUT" "${CHECK_FLAGS[@]}"
PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
step fsdp "${LIMITS[1]}" python3 -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml \
  --num_processes 1 --main_process_port "$PORT" benchmarks/gpu_qlora_memory.py "${MEMORY_FLAGS[@]}" \
  --recipe recipes/llama-3.1-8b/hh_rlhf_fsdp.yaml --out-dir "$OUT"
python3 benchmarks/gpu/check.py --summarize --out-dir "$OUT" --steps-file "$STEPS"
rc=$?  # 1 when a step failed or ran out of time
rm -f "$STEPS"
exit $rc
