#!/usr/bin/env bash
# Equal-budget ablation twins of the SIN models: the same fine-tuning recipe (init, epochs, schedule, occluded
# window sizes, consistency weight, batch size, seed, data order) with no SIN layer and the window's pixels
# filled, as Minority Reports certifies. Resumable; a finished run is skipped. Usage: train_ablation.sh cifar10|imagenette
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
T="--threads ${THREADS:-1}"
case "${1:-}" in
  cifar10)
    $PY -m scalecert train --name cifar10_resnet20_occl --dataset cifar10 --init cifar10_resnet20_vanilla \
      --occlusion pixels --twin cifar10_resnet20_sin1_r20 --occlude 0.4,2.4 --consistency 1.0 --epochs 8 --lr 0.02 \
      --eval-subset 2000 $T
    $PY -m scalecert recalibrate cifar10_resnet20_occl --images 10000 $T ;;
  cifar10_wo4)
    $PY -m scalecert train --name cifar10_resnet20_occl_wo4 --dataset cifar10 --init cifar10_resnet20_occl \
      --occlusion pixels --twin cifar10_resnet20_sin1_r20_wo4 --occlude 0.4,2.4 --consistency 1.0 --occlude-worst-of 4 \
      --epochs 10 --lr 0.01 --eval-subset 2000 $T
    $PY -m scalecert recalibrate cifar10_resnet20_occl_wo4 --images 10000 $T ;;
  imagenette)
    $PY -m scalecert train --name imagenette_resnet18w16_occl --dataset imagenette --init imagenette_resnet18w16_vanilla \
      --occlusion pixels --twin imagenette_resnet18w16_sin1_r10 --occlude 1,2,3 --occlude-tau 0.3 --consistency 1.0 \
      --epochs 5 --batch-size 32 --lr 0.02 --eval-subset 1000 $T
    $PY -m scalecert recalibrate imagenette_resnet18w16_occl --images 10000 $T ;;
  *) echo "usage: $0 cifar10|cifar10_wo4|imagenette" >&2; exit 2 ;;
esac
