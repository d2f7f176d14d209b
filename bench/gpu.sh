#!/usr/bin/env bash
# The benchmark suite in one script, sized to end inside 8 minutes on one H100 (protocol: bench/RESULTS.md).
#
#   GPU machine, project root, ./.whl carried (bash ../shared/gpu/fetch_wheels.sh makes it; WHEELS=DIR
#   points elsewhere):   OUT=/path/to/results bash bench/gpu.sh
#   any CPU, to check the whole script end to end with tiny models before spending GPU time:
#       OUT=/tmp/gpu-smoke bash bench/gpu.sh --cpu
#
# Installs nothing but the carried wheels (into /tmp/site), then runs three phases, each under its own
# time budget (cases that would start late are skipped and listed) and a hard `timeout`:
#   1. training, ELT-L 8N×3L masked (d=1024, 257 tokens, batch 64, ZeRO-2 bf16): ILSD vs vanilla vs the
#      24-unique-layer baseline, per-loop checkpointing, compile on/off, each fast path switched off once
#   2. training, diffusion ELT 7N×4L (d=1152, 256 tokens, batch 64): compiled and eager, baseline
#   3. sampling, both families, L = 1..L_max: eager, CUDA graphs, torch.compile, and the baseline
# Writes $OUT/{train_masked,train_diffusion,sample}.json, profile.txt (torch.profiler, first case), env.txt,
# gpu.log and summary.md (the tables). Run 1 of bench/RESULTS.md took 189 s of a 540 s slot.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if [ "${1:-}" = "--cpu" ]; then
  tiny=(--tiny)    # same cases and budgets as on the GPU, models shrunk to CPU size
  steps=(--steps 1 --windows 2 --warmup 1)
else
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 || exit 1
  tiny=()
  steps=(--steps 6 --windows 3 --warmup 3 --compile-cost 20)
fi
{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; python3 -c 'import torch; print("torch", torch.__version__)'; } > "$OUT/env.txt"

failed=()
phase() {   # NAME HARD_LIMIT_S COMMAND...: run one phase, never longer than its limit; later phases still run
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s) =="
  timeout -k 10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s =="
  [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
}

# Ordered most important first: the issue's targets (compiled ILSD step, ILSD/vanilla, checkpointing),
# each measured twice, interleaved: on an H200 the same case varied by up to ±10% between repeats.
phase train_masked 230 python3 bench/train_throughput.py --preset elt-l-masked "${tiny[@]}" "${steps[@]}" \
  --cases ilsd:none:layer,vanilla:none:layer,ilsd:loop:layer,ilsd:none:layer,vanilla:none:layer,ilsd:loop:layer,ilsd:none:off,vanilla:none:off,baseline:none:off,baseline:none:layer,ilsd:loop:off,ilsd:none:layer:overlap-comm,ilsd:none:layer:zero0,ilsd:none:layer:no-fused-adamw,ilsd:none:layer:sdpa-math,ilsd:none:layer:sdpa-flash,ilsd:none:layer:loop-sync,ilsd:none:off:fp32,ilsd:none:block \
  --time-budget 200 --profile "$OUT/profile.txt" --out "$OUT/train_masked.json"

phase train_diffusion 120 python3 bench/train_throughput.py --preset elt-xl-diffusion "${tiny[@]}" "${steps[@]}" \
  --cases ilsd:none:layer,vanilla:none:layer,ilsd:none:off,ilsd:none:layer,vanilla:none:layer,baseline:none:layer,baseline:none:off,vanilla:none:off \
  --time-budget 95 --out "$OUT/train_diffusion.json"

phase sample 120 python3 bench/sample_throughput.py "${tiny[@]}" \
  --modes eager,cudagraphs,compile --batch 64,1 --baseline --warmup 2 --repeats 5 \
  --time-budget 95 --out "$OUT/sample.json"

python3 bench/summarize.py "$OUT" | tee "$OUT/summary.md"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu.sh: FAILED phases: ${failed[*]} (see $OUT/gpu.log); done in $SECONDS s" >&2
  exit 1
fi
echo "gpu.sh: done in $SECONDS s; results in $OUT"
