#!/usr/bin/env bash
# Issue 25 lever "a larger micro-batch per GPU": the compiled ILSD step at micro-batch 64/256 (masked
# ELT-L 8N×3L) and 64/128 (diffusion 7N×4L), each case twice, one process per micro-batch (bench/RESULTS.md).
#   GPU machine, .whl carried:  OUT=DIR bash bench/gpu_microbatch.sh        CPU flow check: ... --cpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ "${1:-}" = "--cpu" ]; then tiny=(--tiny); steps=(--steps 1 --windows 1 --warmup 1); mb=(4 8); else
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl 2>/dev/null \
    && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 || exit 1
  tiny=(); steps=(--steps 6 --windows 3 --warmup 3 --compile-cost 10); mb=(64 256 128); fi
for m in "${mb[@]:0:2}"; do
  timeout -k 5 60 python3 bench/train_throughput.py --preset elt-l-masked train.micro_batch=$m "${tiny[@]}" "${steps[@]}" \
    --cases ilsd:none:layer,ilsd:none:layer --out "$OUT/mb_masked_$m.json" 2>&1 | grep -E "ms/step|error|Error"
done
for m in "${mb[0]}" "${mb[2]:-${mb[1]}}"; do
  timeout -k 5 60 python3 bench/train_throughput.py --preset elt-xl-diffusion train.micro_batch=$m "${tiny[@]}" "${steps[@]}" \
    --cases ilsd:none:layer,ilsd:none:layer --out "$OUT/mb_diffusion_$m.json" 2>&1 | grep -E "ms/step|error|Error"
done
echo "gpu_microbatch.sh: done in $SECONDS s"
