#!/usr/bin/env bash
# femurseg on an NVIDIA GPU: one prepared script, under 8 minutes, one summary table at the end.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a GPU
#
# 1. the CUDA build of torch 2.13 (installed into .venv when the torch there has no CUDA);
# 2. the GPU tests (pytest -m gpu);
# 3. a 2-fold demo cv on 8 phantoms with float16 AMP (precision auto on CUDA), 4 epochs;
# 4. paper-size inference: 001's 3D U-Net (F32 L4, dilations 1,2,4,8) on 48 x 256 x 256
#    (paper: ~5 s per subject on a P100) and 003's V-Net on a CT femur box (paper: 0.3 s per CT on a
#    1080 Ti), median of 5 after a warm-up, float16 autocast;
# 5. one DDP training epoch on 1 GPU (torchrun --nproc_per_node 1 ... femurseg train --ddp).
# Writes its logs and summary.md under ${OUT:-gpu_check_out}/. Never part of CI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
START=$(date +%s)
declare -a ROWS
row() { ROWS+=("| $1 | $2 | $3 |"); echo "[gpu_check] $1: $2 ($3)"; }
left() { echo $(( 480 - ($(date +%s) - START) )); }

if [ ! -x "$PY" ]; then
  python3 -m venv .venv && .venv/bin/pip install --quiet torch==2.13.0 && .venv/bin/pip install --quiet -e '.[test]'
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[gpu_check] torch in $PY has no CUDA: installing the CUDA build of torch 2.13.0"
  "$PY" -m pip install --quiet --force-reinstall "torch==2.13.0" --extra-index-url https://pypi.org/simple > "$OUT/pip.log" 2>&1 || true
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" 2>/dev/null)
TORCH=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda)" 2>/dev/null)
row "GPU / torch" "$GPU" "$TORCH"
if [ "$GPU" = "none" ]; then row "result" "no CUDA device usable" "stopped"; printf '%s\n' "${ROWS[@]}" > "$OUT/summary.md"; exit 1; fi
FS=.venv/bin/femurseg

t0=$(date +%s)
timeout "$(left)" "$PY" -m pytest -q -m gpu -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
rc=$?; row "GPU tests (pytest -m gpu)" "$(tail -1 "$OUT/pytest_gpu.log")" "exit $rc, $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
timeout "$(left)" bash -c "$FS synth $OUT/data --n 8 --seed 0 > $OUT/synth.log 2>&1 && \
  $FS cv $OUT/data --out $OUT/run --folds 2 --max-epochs 4 --min-epochs 4 --device cuda --overwrite > $OUT/cv.log 2>&1"
rc=$?
row "demo cv, 8 phantoms, 2 folds x 4 epochs, cuda" "$(grep -o 'out-of-fold mean.*' "$OUT/cv.log" | head -1)" \
    "exit $rc, $(( $(date +%s) - t0 )) s wall, precision $("$PY" -c "import json; print(json.load(open('$OUT/run/config.json'))['precision']['used'])" 2>/dev/null)"

timeout "$(left)" "$PY" - > "$OUT/inference.log" 2>&1 <<'PYEOF'
import statistics, time, torch
from femurseg.models import build_model
from femurseg.inference.tiling import predict_prob
import numpy as np
def timed(model, shape):
    model = model.cuda().eval()
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    predict_prob(model, x, device="cuda")  # warm-up (cuDNN set-up)
    ts = []
    for _ in range(5):
        torch.cuda.synchronize(); t = time.perf_counter()
        predict_prob(model, x, device="cuda"); torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
torch.manual_seed(0)
u = timed(build_model({"name": "unet3d", "features": 32, "levels": 4, "dilations": [1, 2, 4, 8]}), (48, 256, 256))
print(f"RESULT unet3d_paper {u:.4f}")
v = timed(build_model({"name": "vnet"}), (128, 128, 128))
print(f"RESULT vnet_ct {v:.4f}")
PYEOF
row "001 3D U-Net F32 L4 dil, 48x256x256 (paper: ~5 s, P100)" "$(awk '/RESULT unet3d_paper/{print $3 " s per subject"}' "$OUT/inference.log")" "fp16 autocast, median of 5"
row "003 V-Net, 128^3 CT box (paper: 0.3 s, 1080 Ti)" "$(awk '/RESULT vnet_ct/{print $3 " s per CT box"}' "$OUT/inference.log")" "fp16 autocast, median of 5"

t0=$(date +%s)
timeout "$(left)" .venv/bin/torchrun --nproc_per_node 1 -m femurseg.cli train "$OUT/data" --out "$OUT/ddp" --ddp \
  --max-epochs 1 --min-epochs 1 --device cuda --overwrite > "$OUT/ddp.log" 2>&1
rc=$?; row "DDP, 1 GPU, 1 epoch (torchrun)" "$(tail -1 "$OUT/ddp.log")" "exit $rc, $(( $(date +%s) - t0 )) s"

{ echo "# femurseg gpu_check $(date -u +%Y-%m-%d) on $GPU"; echo; echo "| check | result | notes |"; echo "|---|---|---|";
  printf '%s\n' "${ROWS[@]}"; echo; echo "total $(( $(date +%s) - START )) s"; } | tee "$OUT/summary.md"
