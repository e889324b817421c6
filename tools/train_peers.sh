#!/usr/bin/env bash
# Train the peer defences' models (scalecert.baselines), in order; each resumes from its last epoch.
# Usage: bash tools/train_peers.sh [bagnet-cifar|bagnet-imagenette|ds-cifar|ds-imagenette|ibp|all]
# Long: hours on a 2-core CPU; never run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
T="--threads ${THREADS:-1}"
which=${1:-all}
run() { [[ $which == all || $which == "$1" ]]; }
if run bagnet-cifar; then
  $PY -m scalecert.baselines.bagnet train --name cifar10_bagnet11 --dataset cifar10 --arch bagnet11_cifar \
    --epochs 15 --eval-subset 1000 $T
fi
if run ds-cifar; then
  $PY -m scalecert.baselines.smoothing train --name cifar10_ds_resnet20 --dataset cifar10 --epochs 15 $T
fi
if run ibp; then
  $PY -m scalecert.baselines.ibp train --name cifar10_ibp_small --patch 2.4 --epochs 10 $T
fi
if run bagnet-imagenette; then
  $PY -m scalecert.baselines.bagnet train --name imagenette_bagnet17w16 --dataset imagenette --arch bagnet17_w16 \
    --epochs 12 --batch-size 64 --eval-subset 1000 $T
fi
if run ds-imagenette; then
  $PY -m scalecert.baselines.smoothing train --name imagenette_ds_resnet18w16 --dataset imagenette --epochs 10 \
    --batch-size 64 $T
fi
