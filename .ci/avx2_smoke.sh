#!/usr/bin/env bash
# AVX2-only CPUs (most laptops, desktops, AMD Zen 2/3 servers, many cloud VMs): oneDNN capped to AVX2
# runs exactly the kernels it runs there. A 1-epoch, 2-fold `femurseg cv` on 4 phantoms plus one
# `femurseg predict` must finish within SMOKE_LIMIT_S seconds (default 90; 15 s in float32
# on a 2-core machine, several minutes if training fell back to emulated bfloat16) and record
# float32 as the precision used; then the tests that touch precision run under the same cap.
set -euo pipefail
cd "$(dirname "$0")/.."
export ONEDNN_MAX_CPU_ISA=AVX2
BIN=${BIN:-.venv/bin}
LIMIT=${SMOKE_LIMIT_S:-90}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
start=$(date +%s)
if ! timeout "$LIMIT" bash -c "
  set -e
  $BIN/femurseg synth $T/data --n 4 --seed 0 > $T/log 2>&1
  $BIN/femurseg cv $T/data --out $T/run --folds 2 --max-epochs 1 --min-epochs 1 >> $T/log 2>&1
  $BIN/femurseg predict $T/run -i $T/data/imagesTr/hip_0000_0000.nii.gz -o $T/mask.nii.gz >> $T/log 2>&1
"; then
  tail -20 "$T/log"
  echo "AVX2 smoke: FAILED (error, or over the ${LIMIT} s limit: a precision cliff?)"
  exit 1
fi
secs=$(( $(date +%s) - start ))
used=$($BIN/python -c "import json; print(json.load(open('$T/run/config.json'))['precision']['used'])")
echo "AVX2 smoke: synth + 2-fold cv + predict in ${secs} s (limit ${LIMIT} s), training precision ${used}"
if [ "$used" != "fp32" ]; then
  echo "AVX2 smoke: FAILED: training used ${used} on an AVX2-only CPU (bfloat16 is emulated there)"
  exit 1
fi
$BIN/python -m pytest -q -p no:cacheprovider tests/test_precision.py tests/test_train.py tests/test_accel.py
