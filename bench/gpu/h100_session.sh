#!/usr/bin/env bash
# Everything this project measures on the lent H100, in one command (device time is scarce):
#   run(command="bash bench/gpu/h100_session.sh", carry=["kvstore/_proto", ".devcarry", ".whl"])
# PARTS (env) picks a subset: tests, gpu, stream, hash, vram, demo, demo-bench (DEMO_ARGS adds flags, e.g. "--vram 16GiB:0",
# DEMO_TAG suffixes its JSON; STREAM_ARGS/STREAM_TAG and GPU_ARGS/GPU_TAG (e.g. GPU_ARGS=--token-sequence) do
# the same for stream and gpu).  Logs and JSON land in $OUT.
set -o pipefail
OUT=${OUT:-/tmp/kvstore-out}; mkdir -p "$OUT"
source bench/gpu/prepare.sh || exit 1
export PYTHONUNBUFFERED=1 GRPC_VERBOSITY=ERROR
PARTS=${PARTS:-tests gpu stream demo demo-bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0
for part in $PARTS; do
  echo "=== $part $(date +%T)"
  case $part in
    tests) python3 -m pytest -q -p no:cacheprovider tests/gpu tests/tiers/test_vram.py tests/tiers/test_vram_placement.py 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    gpu) python3 bench/gpu/bench_gpu.py --layers 4 --reps 4 ${GPU_ARGS:-} --json "$OUT/bench_gpu${GPU_TAG:-}.json" 2>&1 | tail -40 ;;
    stream) python3 bench/gpu/bench_gpu.py --stream-only ${STREAM_ARGS:-} --json "$OUT/bench_stream${STREAM_TAG:-}.json" 2>&1 | tail -20 ;;
    hash) python3 bench/gpu/bench_gpu.py --hash-only --json "$OUT/bench_hash.json" 2>&1 | tail -20
          python3 bench/gpu/bench_gpu.py --interference-only --json "$OUT/bench_interference.json" 2>&1 | tail -12 ;;
    vram) python3 bench/gpu/bench_gpu.py --vram-only --vram-move-batch 4096 --json "$OUT/bench_vram.json" 2>&1 | tail -20 ;;
    demo) python3 -m kvstore.cli.main demo pd --model 8b --device cuda --own-cluster --new-tokens 32 \
            --lengths ${DEMO_LENGTHS:-1000,2048} ${DEMO_ARGS:-} --out "$OUT/demo${DEMO_TAG:-}.json" 2>&1 | tail -30 ;;
    demo-bench) python3 -m kvstore.cli.main demo pd --bench --model 8b --device cuda --own-cluster \
            --lengths ${BENCH_LENGTHS:-2048,8192,32768} --runs ${BENCH_RUNS:-3} ${DEMO_ARGS:-} --out "$OUT/demo_bench${DEMO_TAG:-}.json" 2>&1 | tail -30 ;;
  esac
  status=$?; [ $status -ne 0 ] && { echo "=== $part failed ($status)"; rc=$status; }
done
exit $rc
