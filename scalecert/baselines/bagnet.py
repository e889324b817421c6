"""BagNet-style small-receptive-field ResNets: the feature extractors of CBN, PG-Mask-BN and PatchGuard++.

Method
------
Brendel and Bethge, "Approximating CNNs with Bag-of-local-Features models works surprisingly well
on ImageNet", ICLR 2019 (BagNet). A ResNet whose residual blocks use 1x1 convolutions in place of
most 3x3 ones, so that every position of the last feature map sees only a small pixel square (its
receptive field). The linear head is applied at every position, giving *local logits*
``(B, classes, h, w)`` (class evidence per position); the prediction is their spatial mean, which
equals the usual global-average-pool + linear head. The patch defences in
:mod:`scalecert.baselines.patchguard` rely on one property only: a patch changes only the local
logits whose receptive field meets it.

Architectures (geometry derived from the modules by :func:`scalecert.geometry.units_geometry`,
pinned in :data:`STATED_GEOMETRY` and checked by the tests against the input-gradient support)
------------------------------------------------------------------------------------------------
Every block is a bottleneck 1x1 -> kxk/stride -> 1x1 with a 1x1/stride projection shortcut when the
shape changes; k = 3 in the first ``n3`` blocks of a stage and k = 1 elsewhere (BagNet's rule).
Convolutions use "same" zero padding (k - 1) / 2. Feature (i, j) sees the pixel box
``[i*S - P, i*S - P + K - 1]`` (rows; columns alike), clipped to the image.

* ``bagnet11_cifar`` (CIFAR-10, 32 x 32): stem 3x3/1 (32 ch); stages (blocks, out channels, stride,
  3x3 blocks) = (1, 64, 1, 1), (2, 128, 2, 1), (2, 256, 1, 1). Local-logit map 16 x 16,
  **stride S = 2, receptive field K = 11 px, padding P = 5** (K = 1 + 2 + 2 + 2 + 2*2; about 50 M
  multiply-adds per image). K = 11 is inside the 9-13 px usual for BagNets on CIFAR-sized inputs.
* ``bagnet17_w16`` (Imagenette, 224 x 224; BagNet-17 field and stride at a narrow width): stem
  5x5/2 (24 ch); stages (1, 64, 2, 1), (2, 128, 2, 1), (1, 256, 1, 0). Local-logit map 28 x 28,
  **S = 8, K = 17 px, P = 8** (K = 1 + 4 + 2*2 + 2*4). BagNet-17 reaches the same K = 17 and S = 8
  with a full-resolution 3x3 stem and three stride-2 3x3 blocks (1 + 2 + 2 + 4 + 8); the 5x5/2 stem
  drops the full-resolution convolutions and makes training about 4x cheaper (about 120 M
  multiply-adds per image; measured 36 ms per training image at one CPU thread).
* ``bagnet_tiny`` (tests only): stem 3x3 (8 ch); stages (1, 16, 2, 1), (1, 16, 1, 0): **S = 2, K = 5, P = 2**.

``python -m scalecert.baselines.bagnet geometry --size N`` prints these numbers from the modules.

Training (``python -m scalecert.baselines.bagnet train --name NAME --dataset cifar10 --epochs N``)
is plain cross-entropy on the mean of the local logits, SGD with Nesterov momentum and a one-cycle
learning rate, random-crop (reflect padding) + flip augmentation from :mod:`scalecert.train`.
State is saved after every epoch under ``data/runs/NAME/`` (``state.pt``, ``log.jsonl``) and an
interrupted run resumes; the result is an fp16 checkpoint ``data/checkpoints/NAME.pt`` with a JSON
card holding its sha256 (written by :func:`scalecert.models.save_checkpoint`), which
:func:`load_bagnet` checks (through :func:`scalecert.models.read_checkpoint`, which also refuses non-finite
weights). The resumable-run bookkeeping is :func:`scalecert.runstate.resume_run` and
:func:`scalecert.runstate.end_epoch` (shared with the other peers).

Simplifications (say so beside any number made with this module)
-----------------------------------------------------------------
* "Same" zero padding instead of BagNet's valid convolutions (so edge positions see partly padded
  fields, and the map is n / S wide); residual shortcuts are not cropped.
* Much narrower and shallower than BagNet-17/33 (ResNet-50 widths), trained from scratch on CIFAR-10
  at its native 32 x 32 (PatchGuard upsamples CIFAR to 192 x 192 and fine-tunes ImageNet BagNets)
  and on Imagenette for a few CPU epochs: accuracies are far below the peers' published ones.
* No clipping or masking is used during training (PatchGuard trains the plain BagNet too; CBN
  fine-tunes with clipping, which we do not).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import Geometry, units_geometry
from ..models import (
    CHECKPOINT_DIR,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEASURED_ON,
    Normalize,
    read_checkpoint,
    round_to_storage,
    save_checkpoint,
)
from ..paths import RUNS_DIR, relative
from ..runstate import ResumableRun, finished_card, prepare
from . import add_run_args, balanced_ids

#: name -> (stem (width, kernel, stride), stages as (blocks, out channels, stride, blocks with a 3x3), mean, std)
ARCHS = {
    "bagnet11_cifar": ((32, 3, 1), ((1, 64, 1, 1), (2, 128, 2, 1), (2, 256, 1, 1)), CIFAR_MEAN, CIFAR_STD),
    "bagnet17_w16": ((24, 5, 2), ((1, 64, 2, 1), (2, 128, 2, 1), (1, 256, 1, 0)), IMAGENET_MEAN, IMAGENET_STD),
    "bagnet_tiny": ((8, 3, 1), ((1, 16, 2, 1), (1, 16, 1, 0)), CIFAR_MEAN, CIFAR_STD),
}
#: The receptive-field geometry of each architecture's local-logit map, as stated in the docstring.
STATED_GEOMETRY = {
    "bagnet11_cifar": Geometry(2, 11, 5),
    "bagnet17_w16": Geometry(8, 17, 8),
    "bagnet_tiny": Geometry(2, 5, 2),
}
DEFAULT_ARCH = {"cifar10": "bagnet11_cifar", "imagenette": "bagnet17_w16", "imagenet": "bagnet17_w16"}


# --------------------------------------------------------------------------- model
class BagBlock(nn.Module):
    """Bottleneck residual block 1x1 -> kxk/stride -> 1x1 (+ projection shortcut), BagNet style.

    Children are registered in forward order and the shortcut is called ``downsample`` so that
    :func:`scalecert.geometry.module_geometry` derives the block's receptive field.
    """

    def __init__(self, inplanes: int, out: int, kernel: int, stride: int):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd for same padding, got {kernel}")
        mid = max(1, out // 4)
        self.conv1 = nn.Conv2d(inplanes, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class BagNet(nn.Module):
    """A small-receptive-field ResNet on [0, 1] images with a per-position linear head.

    ``local_logits(x)`` is (B, classes, h, w); ``forward(x)`` is their spatial mean (B, classes).
    """

    sin_layer = None  # no SIN layer: present so scalecert.models.save_checkpoint can write the card
    sin_rate = None
    sin = None  # lets scalecert.train.evaluate run on a BagNet

    def __init__(self, arch: str, num_classes: int = 10):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown BagNet architecture {arch!r}: expected one of {sorted(ARCHS)}")
        (c, k, s), stages, mean, std = ARCHS[arch]
        self.arch, self.num_classes = arch, int(num_classes)
        self.normalize = Normalize(mean, std)
        units: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, c, k, s, (k - 1) // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        ]
        for blocks, out, stride, n3 in stages:
            for b in range(blocks):
                units.append(BagBlock(c, out, 3 if b < n3 else 1, stride if b == 0 else 1))
                c = out
        self.units = nn.Sequential(*units)
        self.head = nn.Linear(c, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map (B, C, h, w) of [0, 1] images."""
        return self.units(self.normalize(x))

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class evidence of every feature position (B, classes, h, w): the head applied per position."""
        return F.conv2d(self.features(x), self.head.weight[:, :, None, None], self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_logits(x).mean((2, 3))

    def geometry(self) -> Geometry:
        """Return the stride, receptive field and padding of the local-logit map (derived from the modules)."""
        return units_geometry([self.normalize, *self.units])

    def logit_shape(self, n: int) -> tuple[int, int]:
        """Return (h, w) of the local-logit map for an n x n input."""
        with torch.no_grad():
            p = next(self.parameters())
            return tuple(self.features(torch.zeros(1, 3, n, n, device=p.device, dtype=p.dtype)).shape[2:])


def bagnet(arch: str = "bagnet11_cifar", num_classes: int = 10) -> BagNet:
    """Return a freshly initialised BagNet of a named architecture."""
    return BagNet(arch, num_classes)


# --------------------------------------------------------------------------- checkpoints
def load_bagnet(name_or_path, device="cpu") -> BagNet:
    """Return a BagNet (eval mode) from a checkpoint name or .pt path after checking the sha256 on its card."""
    blob, card, path = read_checkpoint(name_or_path)
    model = BagNet(blob["arch"], blob["num_classes"])
    model.load_state_dict(blob["state"])
    model.card = dict(card, path=str(path))
    return model.to(device).eval()


# --------------------------------------------------------------------------- training
def train_step(model: BagNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Run one SGD step of cross-entropy on the mean local logits; return (loss before the step, correct)."""
    model.train()
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), int((out.argmax(1) == y).sum())


def train_bagnet(
    name: str,
    dataset: str = "cifar10",
    arch: str | None = None,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 0.1,
    wd: float = 5e-4,
    seed: int = 0,
    threads: int = 0,
    max_train: int = 0,
    eval_subset: int = 1000,
    device="cpu",
    runs_dir=None,
    out_dir=None,
    train_set=None,
    eval_set=None,
    command: str = "",
    save_every: float = 600.0,
    stop_after: int = 0,
) -> dict:
    """Train (or resume) a BagNet; write runs_dir/NAME/{state.pt,log.jsonl} and out_dir/NAME.{pt,json}; return the card.

    One JSON line per epoch in log.jsonl (loss, train accuracy, accuracy on ``eval_subset``
    evaluation images, learning rate, seconds). The card holds the accuracy on the whole evaluation
    split. ``train_set``/``eval_set`` (ImageSets) replace the data set (tests); ``max_train`` > 0
    uses only that many training images per epoch and marks the checkpoint provisional.
    """
    from .. import data as D
    from ..train import evaluate

    train_set, eval_set, n = prepare(seed, threads, dataset, train_set, eval_set)
    arch = arch or DEFAULT_ARCH.get(train_set.name, "bagnet11_cifar" if n <= 64 else "bagnet17_w16")
    model = BagNet(arch, len(train_set.classes)).to(device)
    n_train = min(max_train or len(train_set), len(train_set))
    steps = math.ceil(n_train / batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, epochs * steps), pct_start=0.15)
    config = {
        "arch": arch,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "wd": wd,
        "seed": seed,
        "max_train": max_train,
    }
    run_dir = Path(runs_dir or RUNS_DIR) / name
    log_path = run_dir / "log.jsonl"
    done = finished_card(Path(out_dir or CHECKPOINT_DIR) / f"{name}.json", config, epochs)
    if done is not None:
        return done
    run = ResumableRun(run_dir, config, device, save_every, stop_after, model=model, opt=opt, sched=sched)
    gen = torch.Generator().manual_seed(seed)
    eval_idx = balanced_ids(eval_set, eval_subset, seed)
    pad = max(1, n // 8) if n < 224 else 16
    for epoch in range(run.start, epochs):
        t = {"tot": 0.0, "correct": 0, "seen": 0}
        for x, y in run.batches(train_set, n_train, batch_size, pad, gen, seed, epoch, device, t):
            loss, right = train_step(model, opt, x, y)
            sched.step()
            t["tot"], t["correct"], t["seen"] = t["tot"] + loss * len(y), t["correct"] + right, t["seen"] + len(y)
        dt = run.epoch_seconds()
        run.end_epoch(
            {
                "epoch": epoch + 1,
                "loss": t["tot"] / t["seen"],
                "train_acc": 100 * t["correct"] / t["seen"],
                "test_acc": evaluate(model, eval_set, eval_idx, device=device),
                "lr": sched.get_last_lr()[0],
                "seconds": round(dt, 1),
            },
            seconds=dt,
        )
    elapsed = run.elapsed
    round_to_storage(model.eval())  # measure the weights that ship
    geo = model.geometry()
    card = {
        "name": name,
        "model": "BagNet",
        **config,
        "status": "final" if not max_train else f"provisional: trained on {n_train} images per epoch only",
        "dataset": D.DATASET_LABELS.get(eval_set.name, eval_set.name),
        "dataset_key": eval_set.name,
        "image_side": n,
        "geometry": {"stride": geo.stride, "rf": geo.rf, "pad": geo.pad},
        "logit_map": list(model.logit_shape(n)),
        "epochs_done": epochs,
        "eval_split": eval_set.split,
        "eval_images": len(eval_set),
        "clean_accuracy": evaluate(model, eval_set, device=device),
        "accuracy_measured_on": MEASURED_ON,
        "train_seconds": round(elapsed, 1),
        "command": command or "python -m scalecert.baselines.bagnet " + shlex.join(sys.argv[1:]),
        "log": relative(log_path),
    }
    return save_checkpoint(model, Path(out_dir or CHECKPOINT_DIR) / f"{name}.pt", card)


# --------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    """``python -m scalecert.baselines.bagnet {train,geometry} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m scalecert.baselines.bagnet",
        description="Train BagNet-style models for CBN / PatchGuard, or print their geometry.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) a BagNet; writes data/checkpoints/NAME.{pt,json}")
    t.add_argument("--name", required=True)
    t.add_argument("--dataset", default="cifar10")
    t.add_argument("--arch", default=None, choices=sorted(ARCHS), help="default: by data set")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--wd", type=float, default=5e-4)
    t.add_argument("--eval-subset", type=int, default=1000, help="images evaluated after each epoch")
    add_run_args(t)
    g = sub.add_parser("geometry", help="print the receptive-field geometry of every architecture")
    g.add_argument("--size", type=int, default=0, help="also print the local-logit map size for this input side")
    a = p.parse_args(argv)
    if a.cmd == "geometry":
        for arch in sorted(ARCHS):
            m = BagNet(arch)
            row = {"arch": arch, **vars(m.geometry()), "params": sum(q.numel() for q in m.parameters())}
            if a.size:
                row["logit_map"] = list(m.logit_shape(a.size))
            print(json.dumps(row))
        return 0
    card = train_bagnet(
        a.name,
        a.dataset,
        a.arch,
        a.epochs,
        a.batch_size,
        a.lr,
        a.wd,
        a.seed,
        a.threads,
        a.max_train,
        a.eval_subset,
        a.device,
        runs_dir=a.runs_dir,
        out_dir=a.out_dir,
        command="python -m scalecert.baselines.bagnet " + shlex.join(argv),
        save_every=a.save_every,
    )
    print(json.dumps({k: card[k] for k in ("name", "clean_accuracy", "sha256")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
