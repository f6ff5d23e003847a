#!/usr/bin/env bash
# GPU check for qrm on ONE GPU (H100 or H200): what only a GPU can show, in at most 420 s of script time including
# the wheel install (QRM_GPU_BUDGET_S), so it fits 8 minutes of device time with the machine's start. Steps, in order;
# the first that fails or runs out of its time STOPS the run with one line, and the summary is still written:
#   setup      install .whl/*.whl into /tmp/qrm-site when trl, bitsandbytes, datasets or fastapi are missing
#   preflight  imports, declared requirements, CUDA, a bitsandbytes NF4 round trip on the GPU (seconds)
#   memory+parity  bitsandbytes CUDA 4-bit training at the 8B recipe's shapes (random init), peak memory vs
#              `qrm plan`, MFU; packed + prefix-shared vs TRL's padded path (rewards, gradients, pairs/s), flash-attn
#              varlen packing when installed, the 4-bit inference kernel vs the training path (benchmarks/gpu/check.py)
#   fsdp       accelerate_configs/fsdp.yaml through `accelerate launch` on one GPU (accelerate's own FSDP2 plugin,
#              Params4bit in bf16 storage), the same 8B backbone reused
#   serve      `qrm serve` dynamic batching vs one text per forward pass on the GPU (benchmarks/serve_bench.py)
#   summary    benchmarks/results/gpu-check-<device>.json: every step's status, what was measured
# Every record carries the device name in its file name. Exit 0 when every step passed, 1 otherwise, 2 setup failed.
#
#   benchmarks/gpu/run.sh              # on the GPU machine
#   benchmarks/gpu/run.sh --dry-run    # CPU, tiny shapes, results in a temp dir (QRM_GPU_OUT): every step and branch
#                                      # (tests/test_gpu_bench_script.py; the FSDP step runs accelerate's FSDP2
#                                      # preparation on a faked GPU process type, benchmarks/gpu/emulate.py)
# Test hooks: QRM_GPU_FAIL_AT=<step> makes that step fail (`<step>:timeout`: run out of time);
# QRM_GPU_PRETEND_MISSING=1 takes the install branch; QRM_GPU_WHEELS / QRM_GPU_SITE: wheel dir / install target.
#
# The GPU image (/work/.library/device/KINDS.md) has python 3.12, torch 2.11+cu130, transformers 5.17, accelerate,
# peft, httpx, but not trl, bitsandbytes, datasets, fastapi or uvicorn. Fetch the wheels once, here, in the repo
# root (.whl/ is git-ignored; ~26 MiB after the zip, of the 64 MiB that travel):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     transformers==5.23.0 trl==1.16.0 peft==0.21.2 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 \
#     multiprocess==0.70.19 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 \
#     pydantic-core==2.46.4 typing-inspection==0.4.2 annotated-types==0.7.0 opentelemetry-api==1.45.3
#   zip -qd .whl/bitsandbytes-*.whl 'bitsandbytes/lib*_cuda1[12]*' 'bitsandbytes/lib*_rocm*' 'bitsandbytes/lib*_xpu*'
# (bitsandbytes keeps its CUDA 13 kernels, for the image's torch 2.11+cu130). Preflight names any other package
# the image has at a version these wheels refuse (pyarrow>=24, fsspec<=2026.9.0, regex>=2025.10.22, ...): add it.
# Device tool: carry [".whl"], timeout_s 480 (the script stops itself by 420 s), command (the records, at most 6
# files with the log, come back from $OUT; copy them into benchmarks/results/ here and commit them):
#   QRM_GPU_OUT=$OUT benchmarks/gpu/run.sh 2>&1 | tee $OUT/run.log
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
T0=$SECONDS START_EPOCH=$(date +%s)
BUDGET=${QRM_GPU_BUDGET_S:-420}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${QRM_GPU_WHEELS:-.whl} SITE=${QRM_GPU_SITE:-/tmp/qrm-site}
if [ "${QRM_GPU_PRETEND_MISSING:-0}" = 1 ] || ! python3 -c "import trl, bitsandbytes, datasets, fastapi, uvicorn" 2>/dev/null; then
  echo "== setup: installing $WHEELS/*.whl into $SITE"
  compgen -G "$WHEELS/*.whl" >/dev/null \
    || { echo "run.sh: STOPPED at setup: trl, bitsandbytes, datasets or fastapi missing and no $WHEELS/*.whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "run.sh: STOPPED at setup: installing $WHEELS/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
echo "setup: $((SECONDS - T0)) s"
if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" QRM_EMULATE_GPU_PROCESSES=1
  OUT=${QRM_GPU_OUT:-$(mktemp -d -t qrm-gpu-dry-XXXX)}
  FLAGS=(--dry-run) MEMORY_FLAGS=(--tiny) SERVE_FLAGS=(--requests 8 --concurrency 4 --rounds 1 --max-length 128)
  LIMITS=(preflight 60 memory+parity 150 fsdp 120 serve 120)
else
  OUT=${QRM_GPU_OUT:-benchmarks/results}
  FLAGS=() MEMORY_FLAGS=(--steps 6 --max-length 1024)
  SERVE_FLAGS=(--device cuda --threads 0 --requests 256 --concurrency 32 --rounds 2 --max-length 1024)
  LIMITS=(preflight 45 memory+parity 170 fsdp 100 serve 70)
fi
mkdir -p "$OUT"
WORK=$(mktemp -d -t qrm-gpu-work-XXXX)  # the 8B backbone (16 GB, built once) and the serve export
trap 'rm -rf "$WORK"' EXIT
STEPS="$OUT/.gpu-check-steps.tsv"
: > "$STEPS"
PLANNED=() STOPPED=""
for ((i = 0; i < ${#LIMITS[@]}; i += 2)); do PLANNED+=("${LIMITS[i]}"); done
limit_of() { for ((i = 0; i < ${#LIMITS[@]}; i += 2)); do [ "${LIMITS[i]}" = "$1" ] && echo "${LIMITS[i + 1]}"; done; }
step() {  # name, command...: runs unless an earlier step failed; at most its limit and what is left of the budget
  local name=$1 t0=$SECONDS rc limit left
  shift
  [ -n "$STOPPED" ] && return
  limit=$(limit_of "$name") left=$((BUDGET - 15 - (SECONDS - T0)))  # 15 s kept for the summary
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -lt 1 ] && limit=1
  case "${QRM_GPU_FAIL_AT:-}" in
    "$name") set -- python3 -c "raise SystemExit('injected failure (QRM_GPU_FAIL_AT)')" ;;
    "$name:timeout") limit=1; set -- sleep 30 ;;
  esac
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  if [ $rc -ne 0 ]; then
    STOPPED=$name
    local why="exit $rc"
    { [ $rc = 124 ] || [ $rc = 137 ]; } && why="ran out of its ${limit} s"
    echo "run.sh: STOPPED at step $name ($why); not run: $(printf '%s\n' "${PLANNED[@]}" | sed -n "/^$name\$/,\$p" | tail -n +2 | xargs)" >&2
  fi
}
step preflight python3 benchmarks/gpu/check.py --preflight --out-dir "$OUT" "${FLAGS[@]}"
step memory+parity python3 benchmarks/gpu/check.py --out-dir "$OUT" --backbone-dir "$WORK/llama-3.1-8b" "${FLAGS[@]}"
PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
step fsdp python3 -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml \
  --num_processes 1 --main_process_port "$PORT" benchmarks/gpu_qlora_memory.py "${MEMORY_FLAGS[@]}" \
  --recipe recipes/llama-3.1-8b/hh_rlhf_fsdp.yaml --backbone-dir "$WORK/llama-3.1-8b" --out-dir "$OUT"
step serve python3 benchmarks/gpu/serve_step.py --work "$WORK/serve" --out "$OUT" "${FLAGS[@]}" -- "${SERVE_FLAGS[@]}"
python3 benchmarks/gpu/check.py --summarize --out-dir "$OUT" --steps-file "$STEPS" --planned "${PLANNED[*]}" \
  --since "$START_EPOCH"
rc=$?  # 1 when a step failed or ran out of time
rm -f "$STEPS"
echo "run.sh: $((SECONDS - T0)) s in all (budget ${BUDGET} s)"
exit $rc
