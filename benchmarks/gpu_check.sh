#!/usr/bin/env bash
# Everything GPU-specific in one call (fits a 15-minute device lease).
# Before the lease, here: bash benchmarks/fetch_gpu_wheels.sh   (diffusers is not in the GPU image)
# Device call: run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=600)
# Prints tables and copies them to OUT_DIR (default: $OUT or ./gpu-check).
set -uo pipefail
OUT_DIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=python3  # the GPU image's python holds torch; wadi runs from the source tree
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/src:$PWD/benchmarks"
else
  export PYTHONPATH="$PWD/src:$PWD/benchmarks"
fi
$PY -c "import diffusers, wadi" || { echo "diffusers missing: run benchmarks/fetch_gpu_wheels.sh here and carry .whl"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"

# 1. LoRaD numerics on CUDA in half precision (float64 reference on the same device)
timeout 120 $PY - <<'PY' 2>&1 | tee "$OUT_DIR/cuda_numerics.txt"
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
  timeout 150 $PY benchmarks/lorad_layer.py --device cuda --dtype $dt --tokens 16384 2>&1 | tee "$OUT_DIR/lorad_layer_$dt.md"
done

# 3. One WaDi iteration at the real SD1.5 architecture, 512 px, fp16, batch 1 and 2
for b in 1 2; do
  timeout 240 $PY benchmarks/train_step.py --arch sd15 --device cuda --precision fp16 --batch $b \
    --resolution 512 --steps 5 --warmup 2 --rounds 1 2>&1 | tee "$OUT_DIR/train_step_b$b.md"
done
