#!/usr/bin/env bash
# The GPU benchmarks in one go, under 8 minutes on one H100/H200:
#   - bf16 training throughput and useful-token MFU (against the card's dense bf16 peak, 989 TFLOPS for
#     H100 SXM / H200) of 512/8 and 768/16 with cached CLIP features, at the largest batch that fits
#     (bench/train_throughput.py --find_max_batch: doubling from 64 until out of memory, caught in-process),
#   - online CLIP vs cached features for 512/8 at batch 256,
#   - decode tokens/s at batch 1 with and without the KV cache (bench/generate.py), 512/8 and 768/16.
# Every measurement prints one JSON line (collected on stdout); a markdown table with the GPU name, torch
# version, commit and date is appended to bench/RESULTS.md.
#
#   bash bench/gpu.sh                                  # on the GPU machine (PYTHON=... picks the interpreter)
#   BENCH_DEVICE=cpu BENCH_TINY=1 bash bench/gpu.sh    # dry run of the same commands on the CPU, tiny sizes
#
# Environment: BENCH_RESULTS (default bench/RESULTS.md; empty: write no table), BENCH_COMMIT (the commit to
# record when .git is not present), BENCH_BUDGET_S (default 450: stop starting new measurements after it).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${BENCH_DEVICE:-cuda}
TINY=${BENCH_TINY:-0}
RESULTS=${BENCH_RESULTS-bench/RESULTS.md}
BUDGET=${BENCH_BUDGET_S:-450}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/minimind_gpu_bench.XXXXXX")
JSONL=$WORK/measurements.jsonl
: > "$JSONL"
START=$(date +%s)

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else f'no CUDA device visible to {sys.executable} (torch {torch.__version__})')" || exit 1
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi

# Data: the demo set when present (it is git-ignored), else demo-like synthetic data (4000 images).
if [ -f dataset/demo/pretrain.json ] && [ -f dataset/demo/sft.json ] && [ -d dataset/demo/images/train ]; then
  DATA=(--pretrain_data dataset/demo/pretrain.json --sft_data dataset/demo/sft.json --images_path dataset/demo/images/train)
else
  SYN=.cache/bench/synthetic
  N_IMAGES=4000; [ "$TINY" = 1 ] && N_IMAGES=24
  echo "dataset/demo is absent: writing synthetic demo-like data to $SYN ($N_IMAGES images)" >&2
  "$PY" bench/common.py synthetic_data "$SYN" "$N_IMAGES" >/dev/null || exit 1
  DATA=(--pretrain_data "$SYN/pretrain.json" --sft_data "$SYN/sft.json" --images_path "$SYN/images")
fi

if [ "$TINY" = 1 ]; then
  M512=(--dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2)
  M768=(--dim 96 --n_layers 2 --n_heads 4 --n_kv_heads 2)
  SEARCH=(--batch_size 2 --max_batch 4 --steps 1 --warmup 1)
  ONLINE=(--batch_size 2 --steps 1 --warmup 1)
  GEN=(--new_tokens 8 --reps 1 --bw_mb 64)
  T_TRAIN=300; T_GEN=120
else
  M512=(--preset minimind-v-small)
  M768=(--preset minimind-v)
  SEARCH=(--batch_size 64 --max_batch 8192 --steps 10 --warmup 3)
  ONLINE=(--batch_size 256 --steps 10 --warmup 3)
  GEN=(--new_tokens 200 --reps 3 --bw_mb 1024)
  T_TRAIN=130; T_GEN=45
fi

# run NAME LIMIT_S COMMAND...: progress goes to stderr, the command's last line (its JSON) to stdout + $JSONL
run() {
  local name=$1 limit=$2; shift 2
  local elapsed=$(( $(date +%s) - START ))
  if [ $(( elapsed + limit )) -gt "$BUDGET" ] && [ "$TINY" != 1 ]; then
    limit=$(( BUDGET - elapsed ))
    if [ "$limit" -lt 20 ]; then echo "== $name: skipped (time budget of ${BUDGET}s spent)" >&2; return; fi
  fi
  echo "== $name (limit ${limit}s): $*" >&2
  local log="$WORK/$(echo "$name" | tr -c 'A-Za-z0-9\n' '_').log"
  timeout "$limit" "$@" --name "$name" 2>&1 | tee "$log" | grep -v '^{' >&2
  local status=${PIPESTATUS[0]}
  local last; last=$(tail -n 1 "$log")
  if [ "$status" = 0 ] && [ "${last:0:1}" = "{" ]; then
    echo "$last" | tee -a "$JSONL"
  else
    echo "{\"name\": \"$name\", \"error\": \"exit status $status\"}" | tee -a "$JSONL"
  fi
}

TRAIN=("$PY" bench/train_throughput.py --device "$DEVICE" --dtype bfloat16 --preload --num_workers 4 "${DATA[@]}")
run "train 512/8 bf16 cached, max batch"  "$T_TRAIN" "${TRAIN[@]}" "${M512[@]}" --stages pretrain --settings cached --find_max_batch "${SEARCH[@]}"
run "train 768/16 bf16 cached, max batch" "$T_TRAIN" "${TRAIN[@]}" "${M768[@]}" --stages pretrain --settings cached --find_max_batch "${SEARCH[@]}"
run "train 512/8 bf16 online vs cached"   "$T_TRAIN" "${TRAIN[@]}" "${M512[@]}" --stages pretrain --settings online,cached "${ONLINE[@]}"
GENERATE=("$PY" bench/generate.py --device "$DEVICE" "${GEN[@]}")
run "decode 512/8 bf16"  "$T_GEN" "${GENERATE[@]}" "${M512[@]}" --dtype bfloat16
run "decode 512/8 fp32"  "$T_GEN" "${GENERATE[@]}" "${M512[@]}" --dtype float32
run "decode 768/16 bf16" "$T_GEN" "${GENERATE[@]}" "${M768[@]}" --dtype bfloat16

if [ -n "$RESULTS" ]; then
  "$PY" bench/common.py gpu_table "$JSONL" "$RESULTS" && echo "table appended to $RESULTS" >&2
fi
echo "done in $(( $(date +%s) - START ))s; measurements in $JSONL" >&2
