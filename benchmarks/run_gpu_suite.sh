#!/usr/bin/env bash
# GPU suite in one call (H100/H200): CUDA tests, matmul peak, the loss benchmark at N = 4096..262144
# (D = 768; bf16 all modes, fp32 unsup/sup; forward and forward+backward; peak memory; TFLOP/s),
# the max-batch probe, the class-weight-head margin benchmark (bench_margin.py, what time is left),
# merged plots and a summary. Every stage has a time bound; the whole suite
# stays within SUITE_BUDGET_S seconds (default 530, i.e. under the device tool's 10-minute limit).
#
#   bash benchmarks/run_gpu_suite.sh "$OUT"          # on the device machine
#   bash benchmarks/run_gpu_suite.sh /tmp/gpu_run    # anywhere with a CUDA GPU
#
# Outputs in OUT_DIR (few files, as the device tool returns at most 8):
#   SUMMARY.md            headline table, max batch, matmul peak, then every run's full tables
#   suite.log             stage log (times, exit codes) and the test summary
#   gpu_suite.tar.gz      everything: per-run CSV/JSON/markdown, plots, stage logs
#   time_vs_n_bf16_fwdbwd.png, memory_vs_n_bf16_fwdbwd.png   (merged bf16 runs)
# When OUT_DIR is the device tool's $OUT, the unpacked folder is removed after packing.
#
# Environment: SUITE_BUDGET_S (total seconds), SUITE_TESTS (pytest args, default: CUDA-marked tests),
# SUITE_BUILD (auto|0: build the CUDA extension in place when it is missing and nvcc exists),
# SUITE_SIZES (default 4096,16384,65536,262144), SUITE_DIM (768), SUITE_SKIP (extra providers to leave
# out, comma list), and for a dry run of the plumbing on a CPU machine: SUITE_DEVICE=cpu,
# SUITE_PEAK_SIZE (matmul size, default 8192), e.g.
#   SUITE_DEVICE=cpu SUITE_SIZES=64,128 SUITE_DIM=32 SUITE_PEAK_SIZE=256 SUITE_SKIP=compile \
#   SUITE_TESTS="tests/test_parity_torch.py -k unsup" bash benchmarks/run_gpu_suite.sh /tmp/dry
# Wheels in benchmarks/.wheels/ (e.g. inf_cl, carried
# with the run) are installed first with --no-deps --no-index.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR="${1:-${OUT:-benchmarks/results/cuda}}"
BUDGET="${SUITE_BUDGET_S:-530}"
SIZES="${SUITE_SIZES:-4096,16384,65536,262144}"
DEV="${SUITE_DEVICE:-cuda}"
DIM="${SUITE_DIM:-768}"
PEAK_SIZE="${SUITE_PEAK_SIZE:-8192}"
SKIP="${SUITE_SKIP:-}"
SKIP_COMPILE="compile${SKIP:+,$SKIP}"  # torch.compile only in the bf16 unsup run: each graph costs ~30 s
W="$OUT_DIR/suite"
mkdir -p "$W"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$SECONDS

left() { echo $(( BUDGET - (SECONDS - START) )); }
log() { echo "[suite +$(( SECONDS - START ))s] $*" | tee -a "$W/suite.log"; }

# run_stage NAME CAP_S RESERVE_S cmd...: run with a hard timeout of min(CAP, time left - RESERVE)
run_stage() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local t; t=$(left); t=$(( t - reserve )); (( t > cap )) && t=$cap
  if (( t < 15 )); then log "$name: SKIPPED (no time left)"; return 0; fi
  log "$name: start (limit ${t}s): $*"
  timeout --signal=INT --kill-after=15 "$t" "$@" >"$W/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc$( ((rc == 124)) && echo ' (TIMED OUT)')"
  return 0
}
# budget (seconds) to give a python stage whose hard limit is the stage limit
inner() { local t; t=$(left); t=$(( t - $2 )); (( t > $1 )) && t=$1; echo $(( t > 60 ? t - 40 : 20 )); }

log "output: $OUT_DIR, budget ${BUDGET}s, sizes $SIZES"
{ nvidia-smi || true; python - <<'PY'
import torch, importlib
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
for m in ("triton", "sentence_transformers", "inf_cl"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "installed"))
    except Exception as e:
        print(m, "not available:", e)
import simcse_kernels
from simcse_kernels.backends import unavailable_reason
print("available_backends(cuda):", simcse_kernels.available_backends("cuda"))
for b in ("triton", "cuda"):
    print(" ", b, unavailable_reason(b, torch.device("cuda")))
PY
} >"$W/env.txt" 2>&1
cat "$W/env.txt" | tail -n 12

if ls benchmarks/.wheels/*.whl >/dev/null 2>&1; then
  run_stage wheels 60 400 python -m pip install --no-deps --no-index benchmarks/.wheels/*.whl
fi
if [ "$DEV" = cuda ] && [ "${SUITE_BUILD:-auto}" != 0 ] && ! python -c "import simcse_kernels._cuda_ext" 2>/dev/null && command -v nvcc >/dev/null; then
  run_stage build_cuda_ext 180 330 env SIMCSE_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 python setup.py build_ext --inplace
fi

# shellcheck disable=SC2086
run_stage cuda_tests 110 300 python -m pytest ${SUITE_TESTS:--m cuda tests} -q -x -p no:cacheprovider
[ -f "$W/cuda_tests.log" ] && tail -n 3 "$W/cuda_tests.log" | tee -a "$W/suite.log"

run_stage matmul_peak 40 260 python benchmarks/matmul_peak.py --device "$DEV" --size "$PEAK_SIZE" --seconds 1.5 --out "$W/peak"

B=$(inner 170 200)
run_stage bench_bf16_unsup 170 200 python benchmarks/bench_loss.py --device "$DEV" --dtype bf16 --sizes "$SIZES" \
  --dim "$DIM" --modes unsup --passes fwd,fwdbwd --skip-providers "$SKIP" --time-budget "$B" --max-call-seconds 5 --out "$W/bf16_unsup"

B=$(inner 120 110)
run_stage bench_bf16_modes 120 110 python benchmarks/bench_loss.py --device "$DEV" --dtype bf16 --sizes "$SIZES" \
  --dim "$DIM" --modes sup,symmetric,mixcse --passes fwd,fwdbwd --skip-providers "$SKIP_COMPILE" --time-budget "$B" \
  --max-call-seconds 5 --out "$W/bf16_modes"

B=$(inner 70 60)
run_stage bench_fp32 70 60 python benchmarks/bench_loss.py --device "$DEV" --dtype fp32 --sizes "$SIZES" \
  --dim "$DIM" --modes unsup,sup --passes fwdbwd,fwd --skip-providers "$SKIP_COMPILE" --time-budget "$B" \
  --max-call-seconds 5 --out "$W/fp32"

B=$(inner 90 25)
run_stage max_batch 90 25 python benchmarks/max_batch.py --device "$DEV" --dtype bf16 --dim "$DIM" --mode unsup \
  --pass fwdbwd --skip-providers "$SKIP" --time-budget "$B" --max-call-seconds 5 --out "$W/max_batch"

# class-weight head (issue 21): CosFace, N = 512, D = 256, C = 65536..2^20 against PML, naive and Cut
# Cross-Entropy's Triton kernels; only the time left (each case is written as it ends)
run_stage bench_margin 90 25 python benchmarks/bench_margin.py --device "$DEV" --max-gib 60 --timeout 60 \
  --out "$W/margin"

run_stage plots 30 0 python benchmarks/plots.py "$W/bf16_unsup/bench_loss.json" "$W/bf16_modes/bench_loss.json" \
  --out "$W/plots_bf16"
python benchmarks/summarize.py "$W/peak" "$W/bf16_unsup" "$W/bf16_modes" "$W/fp32" "$W/max_batch" \
  --markdown "$W/SUMMARY.md" >"$W/summary.txt" 2>&1
log "done in $(( SECONDS - START ))s"

cp "$W/SUMMARY.md" "$W/suite.log" "$OUT_DIR/" 2>/dev/null
cp "$W"/plots_bf16/time_vs_n_bf16_fwdbwd.png "$W"/plots_bf16/memory_vs_n_bf16_fwdbwd.png "$OUT_DIR/" 2>/dev/null
tar czf "$OUT_DIR/gpu_suite.tar.gz" -C "$OUT_DIR" suite
if [ -n "${OUT:-}" ] && [ "$(realpath "$OUT_DIR")" = "$(realpath "$OUT")" ]; then rm -rf "$W"; fi
cat "$OUT_DIR/SUMMARY.md" 2>/dev/null | sed -n '1,/^```$/p' | head -n 150 || true
cat "$OUT_DIR/suite.log"
