import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SCALECERT_TEST_THREADS", min(2, os.cpu_count() or 1))))


def randomise_bn(model):
    """Randomise the running statistics and scales of every BatchNorm2d (from the global RNG); return the model."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return model


def spread_model(arch="resnet20", layer=1, rate=0.2, seed=0, num_classes=10, scale=0.3):
    """A random model whose BN statistics are randomised so that predictions vary between images."""
    from scalecert.models import build

    torch.manual_seed(seed)
    m = randomise_bn(build(arch, num_classes, layer, rate))
    m.eval()
    # centre and scale the head on calibration images so that predictions vary between images
    n = 32 if arch.startswith(("resnet20", "cifar")) else 64
    with torch.no_grad():
        feats = m.head[:2](_body(m, calibration_images(64, n, seed + 100)))
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        fc = m.head[2]
        fc.weight.data = torch.randn_like(fc.weight) / sd / feats.shape[1] ** 0.5 * scale
        fc.bias.data = -(fc.weight.data @ mu)
    return m


def _body(m, x):
    f = m.stem(x)
    if m.sin is not None:
        f = m.sin(f)
    for u in m.units[m.sin_layer :]:
        f = u(f)
    return f


def calibration_images(b, n, seed=0):
    """Images with a random colour per image plus noise: structured enough to give varied predictions."""
    g = torch.Generator().manual_seed(seed)
    col = torch.rand(b, 3, 1, 1, generator=g)
    return (0.6 * col + 0.4 * torch.rand(b, 3, n, n, generator=g)).clamp(0, 1)


@pytest.fixture
def small_model():
    return spread_model()


def _notebook_seconds(path) -> float:
    """Seconds the reference notebook took when `make golden` wrote it (papermill's record); 0 for other files."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.suffix != ".ipynb":
        return 0.0
    try:
        return float(json.loads(path.read_text())["metadata"]["papermill"]["duration"] or 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def pytest_collection_modifyitems(config, items):
    # nbval: the longest notebooks first, so that the xdist workers (one file each, --dist loadfile with
    # --no-loadscope-reorder, which keeps this order) finish together;
    # a file's cells keep their order (stable sort), and the unit tests keep theirs (weight 0)
    weight = {}
    for item in items:
        if item.path not in weight:
            weight[item.path] = _notebook_seconds(item.path)
    items.sort(key=lambda item: -weight[item.path])
