#!/usr/bin/env bash
# The committed CPU results (benchmarks/results/cpu/): each (D, N) group in its own fresh process,
# fp32 forward+backward, 1 torch thread, the load average sampled every 30 s into load.log.
# Usage: bash benchmarks/run_cpu_suite.sh [OUT_DIR] [STAGES]   (STAGES: comma list of 1..5, default all)
set -u
OUT=${1:-benchmarks/results/cpu}
STAGES=${2:-1,2,3,4,5}
RUNS="$OUT/runs"
mkdir -p "$RUNS"
( while true; do echo "$(date -u +%H:%M:%S) $(cut -d' ' -f1-3 /proc/loadavg)"; sleep 30; done ) >> "$OUT/load.log" &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null' EXIT
LABEL="CPU (2-core shared dev box, 1 thread)"
COMMON=(--device cpu --dtype fp32 --passes fwdbwd --threads 1 --no-plots --max-call-seconds 400)
stage() { [[ ",$STAGES," == *",$1,"* ]]; }
# 1. D = 256, N = 1024, 4096: every provider, every mode, memory
stage 1 && python benchmarks/bench_loss.py "${COMMON[@]}" --sizes 1024,4096 --dim 256 --input-sets 3 --repeats 3 \
    --label "$LABEL" --out "$RUNS/d256_small" --time-budget 1500
# 2. D = 768, N = 4096: naive, compile, ours, MNRL; every mode; time only
stage 2 && python benchmarks/bench_loss.py "${COMMON[@]}" --sizes 4096 --dim 768 --input-sets 2 --repeats 3 \
    --providers naive,compile,st_mnrl,torch --no-memory --label "$LABEL" --out "$RUNS/d768_n4096" --time-budget 1200
# 3. D = 256, N = 16384 (M = N modes; sup/mixcse naive would need > 8 GiB): naive, compile, ours; memory
stage 3 && python benchmarks/bench_loss.py "${COMMON[@]}" --sizes 16384 --dim 256 --modes unsup,symmetric \
    --providers naive,compile,torch --input-sets 1 --repeats 2 --case-seconds 200 --cpu-mem-cap-gb 8 \
    --label "$LABEL" --out "$RUNS/d256_n16384" --time-budget 1800
# 4. D = 768, N = 16384, unsup: naive, compile, ours; time only
stage 4 && python benchmarks/bench_loss.py "${COMMON[@]}" --sizes 16384 --dim 768 --modes unsup \
    --providers naive,compile,torch --input-sets 1 --repeats 2 --case-seconds 200 --cpu-mem-cap-gb 8 --no-memory \
    --label "$LABEL" --out "$RUNS/d768_n16384" --time-budget 1500
# 5. the other N = 16384 rows: sup and MixCSE at D = 256, sup/MixCSE/symmetric at D = 768 (naive needs
#   up to ~12 GiB: run it alone on the 24 GiB box; the estimate is conservative), one warm-up and one
#   timed call per provider
stage 5 && python benchmarks/bench_loss.py "${COMMON[@]}" --sizes 16384 --dim 256 --modes sup,mixcse \
    --providers naive,compile,torch --input-sets 1 --repeats 1 --warmup 1 --case-seconds 300 \
    --cpu-mem-cap-gb 20 --label "$LABEL" --out "$RUNS/d256_n16384_sup_mixcse" --time-budget 2400
stage 5 && python benchmarks/bench_loss.py "${COMMON[@]}" --sizes 16384 --dim 768 --modes sup,mixcse \
    --providers naive,compile,torch --input-sets 1 --repeats 1 --warmup 1 --case-seconds 400 \
    --cpu-mem-cap-gb 20 --no-memory --label "$LABEL" --out "$RUNS/d768_n16384_sup_mixcse" --time-budget 3000
# symmetric at D = 768 with memory: ours keeps first-pass logit rows there (the default budget grows with D)
stage 5 && python benchmarks/bench_loss.py "${COMMON[@]}" --sizes 16384 --dim 768 --modes symmetric \
    --providers naive,compile,torch --input-sets 1 --repeats 2 --warmup 1 --case-seconds 400 \
    --cpu-mem-cap-gb 20 --label "$LABEL" --out "$RUNS/d768_n16384_symmetric" --time-budget 1500
python benchmarks/merge_runs.py "$RUNS"/*/bench_loss.json --out "$OUT"
