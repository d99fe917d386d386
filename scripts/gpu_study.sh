#!/usr/bin/env bash
# The `seed` preset's whole study on one GPU, from a checkout, on a machine with torch and
# torchvision only (no Ray, no open_clip: captions and fusion are skipped with a line saying why).
#
#   scripts/gpu_study.sh [DATA_DIR] [OUT]
#
# DATA_DIR: an ImageFolder copy of CIFAR-10 (default data/cifar10-jpeg, git-ignored: copy
# ../shared/datasets/cifar10-jpeg there to carry it to a lent GPU machine); OUT: default
# runs/seed-gpu. Finished stages are reused, so a second call finishes an interrupted study.
# Writes OUT/report.html, report.md and results.json; prints the GPU and the wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-data/cifar10-jpeg}
OUT=${2:-runs/seed-gpu}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
PYTHONPATH=. python -m raysslvit run --preset seed --launcher local --use-gpu true \
    --data-dir "$DATA_DIR" --out "$OUT" "${@:3}"
echo "gpu_study: $(( $(date +%s) - start )) s of wall time; report: $OUT/report.html"
