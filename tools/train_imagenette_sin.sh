#!/usr/bin/env bash
# The Imagenette SIN fine-tunes only (the vanilla model is already final); resumable, finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
T="--threads ${THREADS:-1}"
for spec in "1 10" "1 15" "1 20" "2 10" "3 10"; do
  set -- $spec
  $PY -m scalecert train --name imagenette_resnet18w16_sin$1_r$2 --dataset imagenette \
    --init imagenette_resnet18w16_vanilla --sin-layer $1 --sin-rate 0.$2 --occlude 1,2,3 --occlude-tau 0.3 \
    --consistency 1.0 --epochs 5 --batch-size 32 --lr 0.02 --eval-subset 1000 $T
done
