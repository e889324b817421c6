"""ResNet-family models split at the superficial layer, with the SIN layer and normalisation inside.

Every model is a flat chain of *units* followed by a head (global pool + linear). "Superficial
layer s" is the output of unit s (1-based), which gives the paper's Table 7 meaning:

* torchvision layout (7x7/stride-2 stem + max-pool): layer 1 = conv1-bn-relu, layer 2 = the
  max-pool output (right after the max-pool, as in the paper's ResNet-50), layer 3 = the first
  residual block;
* CIFAR layout (3x3 stem, no max-pool): layer 1 = conv-bn-relu, layer 2/3 = first/second block.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .geometry import Geometry, units_geometry
from .paths import CHECKPOINT_DIR
from .results import atomic_write, atomic_write_text
from .sin import SINLayer

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std on [0, 1] images; pointwise, so it has no receptive field."""

    pointwise = True

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class SplitNet(nn.Module):
    """A CNN as ``units`` + ``head`` with an optional SIN layer after unit ``sin_layer``."""

    def __init__(
        self,
        units: list[nn.Module],
        head: nn.Module,
        mean,
        std,
        arch: str,
        num_classes: int,
        sin_layer: int | None = None,
        sin_rate: float | None = None,
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.units = nn.ModuleList(units)
        self.head = head
        self.arch, self.num_classes = arch, num_classes
        self.sin_layer = 1 if sin_layer is None else int(sin_layer)
        self.sin = SINLayer(sin_rate) if sin_rate is not None else None
        self.rest_layout = None  # memory format rest() puts its input in (rest_channels_last sets it)
        self.set_sin(sin_layer if sin_layer is not None else 1, sin_rate)

    def set_sin(self, layer: int, rate: float | None) -> SplitNet:
        """Place (or remove, with rate=None) the SIN layer after unit ``layer``; return self."""
        if not isinstance(layer, int) or not 1 <= layer <= len(self.units):
            raise ValueError(f"unknown superficial layer {layer!r}: {self.arch} has layers 1..{len(self.units)}")
        self.sin_layer = layer
        self.sin = SINLayer(rate) if rate is not None else None
        return self

    @property
    def sin_rate(self) -> float | None:
        return None if self.sin is None else self.sin.rate

    def geometry(self) -> Geometry:
        """Return the receptive-field geometry of the superficial layer."""
        return units_geometry([self.normalize, *self.units[: self.sin_layer]])

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Return the superficial features (before the SIN layer) of [0, 1] images."""
        x = self.normalize(x)
        for u in self.units[: self.sin_layer]:
            x = u(x)
        return x

    def rest(self, f: torch.Tensor) -> torch.Tensor:
        """Return logits from (already sparsified) superficial features."""
        if self.rest_layout is not None:
            f = f.contiguous(memory_format=self.rest_layout)
        for u in self.units[self.sin_layer :]:
            f = u(f)
        return self.head(f)

    def forward(self, x: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        f = self.stem(x)
        if self.sin is not None:
            f = self.sin(f, exclude)
        elif exclude is not None:
            f = f * (~exclude.view(f.shape[0], 1, *f.shape[2:])).to(f.dtype)
        return self.rest(f)

    def feature_shape(self, n: int) -> tuple[int, int, int]:
        """Return (C, h, w) of the superficial features for an n x n input."""
        key = (n, self.sin_layer)
        shapes = self.__dict__.setdefault("_feature_shapes", {})  # probed once: training asks every step
        if key not in shapes:
            # in eval mode: a probe forward in train mode would pull the BatchNorm running statistics towards a
            # blank image (it did, once per fine-tuning step, until 2026-11-25)
            was = self.training
            self.eval()
            try:
                with torch.no_grad():
                    p = next(self.parameters())
                    shapes[key] = tuple(self.stem(torch.zeros(1, 3, n, n, device=p.device, dtype=p.dtype)).shape[1:])
            finally:
                self.train(was)
        return shapes[key]


def _head(channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _blocks(block, inplanes: int, planes: int, n: int, stride: int) -> tuple[list[nn.Module], int]:
    out = []
    for b in range(n):
        s = stride if b == 0 else 1
        down = None
        if s != 1 or inplanes != planes * block.expansion:
            down = nn.Sequential(
                nn.Conv2d(inplanes, planes * block.expansion, 1, s, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        out.append(block(inplanes, planes, s, down))
        inplanes = planes * block.expansion
    return out, inplanes


def cifar_resnet(depth_blocks: list[int], widths: list[int], num_classes: int = 10, arch: str = "") -> SplitNet:
    """Return a CIFAR-layout ResNet (3x3 stem, no max-pool) with BasicBlocks."""
    units: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    ]
    inplanes = widths[0]
    for i, (n, w) in enumerate(zip(depth_blocks, widths)):
        blocks, inplanes = _blocks(BasicBlock, inplanes, w, n, 1 if i == 0 else 2)
        units += blocks
    return SplitNet(units, _head(inplanes, num_classes), CIFAR_MEAN, CIFAR_STD, arch, num_classes)


def imagenet_resnet(block, layers: list[int], width: int = 64, num_classes: int = 1000, arch: str = "") -> SplitNet:
    """Return a torchvision-layout ResNet (7x7/2 stem + 3x3/2 max-pool) at a given base width."""
    units: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = width
    for i, n in enumerate(layers):
        blocks, inplanes = _blocks(block, inplanes, width * 2**i, n, 1 if i == 0 else 2)
        units += blocks
    return SplitNet(units, _head(inplanes, num_classes), IMAGENET_MEAN, IMAGENET_STD, arch, num_classes)


ARCHS = {
    "resnet20": lambda nc: cifar_resnet([3, 3, 3], [16, 32, 64], nc, "resnet20"),
    "cifar_resnet18": lambda nc: cifar_resnet([2, 2, 2, 2], [64, 128, 256, 512], nc, "cifar_resnet18"),
    "resnet18": lambda nc: imagenet_resnet(BasicBlock, [2, 2, 2, 2], 64, nc, "resnet18"),
    "resnet18w16": lambda nc: imagenet_resnet(BasicBlock, [2, 2, 2, 2], 16, nc, "resnet18w16"),
    "resnet18w32": lambda nc: imagenet_resnet(BasicBlock, [2, 2, 2, 2], 32, nc, "resnet18w32"),
    "resnet50": lambda nc: imagenet_resnet(Bottleneck, [3, 4, 6, 3], 64, nc, "resnet50"),
}


def build(arch: str, num_classes: int = 10, sin_layer: int = 1, sin_rate: float | None = None) -> SplitNet:
    """Return a freshly initialised model of a named architecture."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {sorted(ARCHS)}")
    return ARCHS[arch](num_classes).set_sin(sin_layer, sin_rate)


def from_torchvision_state(arch: str, state: dict, num_classes: int = 1000, **sin) -> SplitNet:
    """Return a SplitNet loaded from a torchvision ResNet state dict (e.g. ImageNet weights on disk)."""
    model = build(arch, num_classes, **sin)
    names = ["units.0.0", "units.0.1"]
    mapping = {"conv1": "units.0.0", "bn1": "units.0.1", "fc": "head.2"}
    out = {}
    blocks = [k for k in state if k.startswith("layer")]
    layer_sizes = {}
    for k in blocks:
        li, bi = int(k.split(".")[0][5:]), int(k.split(".")[1])
        layer_sizes[li] = max(layer_sizes.get(li, 0), bi + 1)
    offsets, u = {}, 2
    for li in sorted(layer_sizes):
        offsets[li] = u
        u += layer_sizes[li]
    for k, v in state.items():
        head, rest = k.split(".", 1)
        if head in mapping:
            out[f"{mapping[head]}.{rest}"] = v
        elif head.startswith("layer"):
            li, bi, tail = int(head[5:]), int(rest.split(".")[0]), rest.split(".", 1)[1]
            out[f"units.{offsets[li] + bi}.{tail}"] = v
    del names
    out.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    model.load_state_dict(out)
    return model


def rest_channels_last(model: SplitNet) -> SplitNet:
    """Return the model, changed in place, with the units after its superficial layer in channels-last layout.

    Measured on this CPU (oneDNN): the Imagenette layers after the SIN layer 1.7x faster, whole engine runs 1.01-1.18x
    (channels-last also suits cuDNN on GPUs). The stem
    keeps the default layout, so the superficial features, SIN(x) and the candidate windows are bit-identical
    with or without it; only the logits of the later layers may move in the last float bits. Other modules than
    :class:`SplitNet` are returned unchanged.
    """
    if not isinstance(model, SplitNet):  # e.g. a hand-built test model: left as it is
        return model
    for i, unit in enumerate(model.units):
        unit.to(memory_format=torch.channels_last if i >= model.sin_layer else torch.contiguous_format)
    model.rest_layout = torch.channels_last  # the weights alone are not enough: a default-layout input stays slow
    return model


# --------------------------------------------------------------------------- checkpoints
#: what a card's accuracies were measured on since 2026-12-06 (before, the fp32 weights the fp16 checkpoint rounds)
MEASURED_ON = "stored weights"


@contextlib.contextmanager
def without_sin(model: nn.Module):
    """Yield the model with its SIN layer switched off (the plain network), restoring the layer however the block
    ends."""
    saved = model.sin
    model.sin = None
    try:
        yield model
    finally:
        model.sin = saved


@torch.no_grad()
def round_to_storage(model: nn.Module) -> nn.Module:
    """Return the model, its floating weights and buffers rounded in place to the fp16 values
    :func:`save_checkpoint` stores, so that what a trainer measures before saving is what ships.

    Rounding twice changes nothing, so saving a rounded model stores exactly the weights it was measured with.
    Raises ValueError before the (long) final measurement if a weight is not finite, in fp32 or once rounded."""
    _check_finite(dict(model.named_parameters()) | dict(model.named_buffers()), half=False)
    _check_finite(dict(model.named_parameters()) | dict(model.named_buffers()), half=True)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(t.half())
    return model


def _check_finite(tensors: dict, half: bool) -> None:
    """Raise ValueError naming the floating tensors that are not finite (as they are, or rounded to fp16)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v.half() if half else v).all()]
    if bad:
        why = "beyond ±65504 once rounded to fp16" if half else "NaN or infinite (did training diverge?)"
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"weights not finite, {why}: {bad[:5]}{more}")


def save_checkpoint(model: SplitNet, path: Path, card: dict, half: bool = True) -> dict:
    """Write model weights (fp16 by default) and a JSON card with their sha256; return the card.

    Trainers call :func:`round_to_storage` before their final measurement, so the card describes these weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    _check_finite(state, half=False)
    try:
        _check_finite(state, half=half)
    except ValueError as e:
        raise ValueError(f"{e}; nothing written (save_checkpoint(..., half=False) keeps fp32)") from None
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(
        {
            "arch": model.arch,
            "num_classes": model.num_classes,
            "sin_layer": model.sin_layer,
            "sin_rate": model.sin_rate,
            "state": state,
        },
        buf,
    )
    data = buf.getvalue()
    card = dict(
        card,
        arch=model.arch,
        num_classes=model.num_classes,
        sin_layer=model.sin_layer,
        sin_rate=model.sin_rate,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
    )
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return write_card(path, card)


def write_card(path: Path, card: dict) -> dict:
    """Write a checkpoint's JSON card beside its .pt (atomically, without the loader's ``path``); return the card."""
    card = {k: v for k, v in card.items() if k != "path"}  # where the loader found it: not part of the card
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def resolve_checkpoint(name_or_path) -> Path:
    """Return the path of a checkpoint given a file path or a shipped checkpoint name."""
    p = Path(name_or_path)
    if p.suffix == ".pt" and p.is_file():
        return p
    cand = CHECKPOINT_DIR / f"{name_or_path}.pt"
    if cand.is_file():
        return cand
    known = sorted(q.stem for q in CHECKPOINT_DIR.glob("*.pt"))
    raise ValueError(f"unknown model {name_or_path!r}: not a .pt file and not one of {known}")


def read_checkpoint(name_or_path, check_hash: bool = True) -> tuple[dict, dict, Path]:
    """Return (blob, card, path) of a checkpoint name or .pt path after checking the sha256 on its card.

    ``blob`` is the saved dict with its "state" in float32 (floating tensors only); ``card`` is the JSON
    card beside the file ({} if none) with "sha256" set to the file's actual digest. A file whose
    digest differs from its card's, or with no card, raises ValueError unless ``check_hash`` is False; so does a
    file with non-finite weights.
    """
    path = resolve_checkpoint(name_or_path)
    data = path.read_bytes()
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    digest = hashlib.sha256(data).hexdigest()
    if check_hash:
        if "sha256" not in card:
            raise ValueError(f"{path}: no card with a sha256 beside it ({card_path}); the card is missing or stale")
        if digest != card["sha256"]:
            raise ValueError(
                f"{path}: sha256 {digest[:12]}… does not match its card ({card_path}: "
                f"{str(card['sha256'])[:12]}…); the file was altered or the card is stale"
            )
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    blob = dict(blob, state={k: v.float() if v.is_floating_point() else v for k, v in blob["state"].items()})
    bad = [k for k, v in blob["state"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: non-finite weights in {bad[:3]} (diverged training or fp16 overflow)")
    return blob, dict(card, sha256=digest), path


def load_model(name_or_path, device="cpu", check_hash: bool = True) -> SplitNet:
    """Return the model of a shipped name or .pt path in eval mode, its later units channels-last
    (:func:`rest_channels_last`), after checking its card's sha256."""
    blob, card, path = read_checkpoint(name_or_path, check_hash)
    model = build(blob["arch"], blob["num_classes"], blob["sin_layer"] or 1, blob["sin_rate"])
    model.load_state_dict(blob["state"])
    model.card = dict(card, path=str(path))
    return rest_channels_last(model.to(device).eval())
