#!/usr/bin/env bash
# Everything GPU-specific in one call (fits a 15-minute device lease).
# Before the lease, here: bash benchmarks/fetch_gpu_wheels.sh   (diffusers is not in the GPU image)
# Device call: run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=600)
# Prints tables and copies them to OUT_DIR (default: $OUT or ./gpu-check); steps.txt says
# which steps finished, failed, ran out of memory or timed out.
# CPU check of the script itself: TINY=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/gc
# (runs only step 4, with the miniature SDXL/FLUX layouts, on the CPU).
set -uo pipefail
OUT_DIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PY:-python3}"  # the GPU image's python holds torch; wadi runs from the source tree
if [ "${TINY:-0}" = 1 ]; then DEV=cpu; SIZE=-tiny; else DEV=cuda; SIZE=; fi
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/src:$PWD/benchmarks"
else
  export PYTHONPATH="$PWD/src:$PWD/benchmarks"
fi
$PY -c "import diffusers, wadi" || { echo "diffusers missing: run benchmarks/fetch_gpu_wheels.sh here and carry .whl"; exit 1; }
[ -z "$SIZE" ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"

# The whole script stays inside its 10-minute budget: every step gets at most its own limit
# and never more than what is left of BUDGET_S; a step that fails, runs out of memory or
# times out is recorded in steps.txt and the next one runs.
BUDGET_S="${BUDGET_S:-570}"
left() { echo $(( BUDGET_S - SECONDS )); }
step() {  # step NAME LIMIT_S LOG_FILE COMMAND... (the command's output also goes to LOG_FILE)
  local name=$1 limit=$2 log=$3 rc; shift 3
  local now; now=$(left)
  (( now < limit )) && limit=$now
  if (( limit < 20 )); then
    echo "$name: skipped (budget spent, ${now}s left)" | tee -a "$OUT_DIR/steps.txt"; return 0
  fi
  timeout "$limit" "$@" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  case $rc in
    0) echo "$name: ok (${SECONDS}s into the check)" ;;
    124) echo "$name: timed out after ${limit}s" ;;
    3) echo "$name: out of memory" ;;
    *) echo "$name: failed (exit $rc)" ;;
  esac | tee -a "$OUT_DIR/steps.txt"
  return "$rc"
}

if [ -z "$SIZE" ]; then
# 1. LoRaD numerics on CUDA in half precision (float64 reference on the same device)
step cuda_numerics 60 "$OUT_DIR/cuda_numerics.txt" $PY - <<'PY'
import torch
from torch import nn
from wadi.lorad import LoRaDConfig, attach, rotate_pairs
for dtype in (torch.float16, torch.bfloat16):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1280, 1280)).cuda()
    attach(m, LoRaDConfig(rank=64))
    with torch.no_grad():
        m[0].lorad_A["default"].normal_(0, 0.05)
    m.to(dtype)
    x = torch.randn(4096, 1280, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = m(x)
    w = rotate_pairs(m[0].base_layer.weight.double(), m[0].theta("default").double())
    ref = x.double() @ w.T + m[0].base_layer.bias.double()
    y.float().sum().backward()
    print(dtype, "max abs err", (y.double() - ref).abs().max().item(), "angle dtype", m[0].lorad_A["default"].dtype,
          "grad finite", bool(torch.isfinite(m[0].lorad_A["default"].grad).all()))
PY

# 2. Layer benchmark at SD1.5 widths, both half precisions
for dt in bf16 fp16; do
  step "lorad_layer_$dt" 75 "$OUT_DIR/lorad_layer_$dt.md" \
    $PY benchmarks/lorad_layer.py --device cuda --dtype $dt --tokens 16384
done

# 3. One WaDi iteration at the real SD1.5 architecture, 512 px, fp16, batch 1 and 2
for b in 1 2; do
  step "train_step_b$b" 90 "$OUT_DIR/train_step_b$b.md" $PY benchmarks/train_step.py --arch sd15 \
    --device cuda --precision fp16 --batch $b --resolution 512 --steps 5 --warmup 2 --rounds 1
done
fi

# 4. One WaDi iteration at the real SDXL-base U-Net and FLUX.1-dev transformer (random weights
#    from their configs, no download), 1024 px, bf16, batch 1: time and peak memory.  FLUX
#    is retried with gradient checkpointing if it runs out of memory.
step sdxl_step 150 "$OUT_DIR/backbone_sdxl.md" \
  $PY benchmarks/backbone_step.py --arch "sdxl$SIZE" --device $DEV --precision bf16 --batch 1 --steps 3 --warmup 1
step flux_step 200 "$OUT_DIR/backbone_flux.md" \
  $PY benchmarks/backbone_step.py --arch "flux$SIZE" --device $DEV --precision bf16 --batch 1 --steps 3 --warmup 1
if [ $? -eq 3 ]; then
  step flux_step_ckpt 200 "$OUT_DIR/backbone_flux_ckpt.md" \
    $PY benchmarks/backbone_step.py --arch "flux$SIZE" --device $DEV --precision bf16 --batch 1 --steps 3 \
    --warmup 1 --gradient-checkpointing
fi
echo "gpu_check finished in ${SECONDS}s" | tee -a "$OUT_DIR/steps.txt"
