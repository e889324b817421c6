import pytest
import torch
from conftest import spread_model

from scalecert.geometry import Geometry, feature_boxes, footprint, module_geometry, rect_masks, region

CASES = [
    ("resnet20", 1, 32),
    ("resnet20", 2, 32),
    ("resnet20", 3, 32),
    ("resnet20", 5, 32),
    ("resnet18w16", 1, 64),
    ("resnet18w16", 2, 64),
    ("resnet18w16", 3, 64),
    ("cifar_resnet18", 2, 32),
]


def test_known_geometries():
    m = spread_model("resnet20", 1)
    assert m.geometry() == Geometry(1, 3, 1)
    m.set_sin(2, 0.1)  # conv3x3 then a block of two 3x3 convs
    assert m.geometry() == Geometry(1, 7, 3)
    r = spread_model("resnet18w16", 1)
    assert r.geometry() == Geometry(2, 7, 3)
    r.set_sin(2, 0.1)  # + max-pool 3/2/1
    assert r.geometry() == Geometry(4, 11, 5)


@pytest.mark.parametrize("arch,layer,n", CASES)
def test_geometry_matches_gradient_support(arch, layer, n):
    m = spread_model(arch, layer)
    geo = m.geometry()
    _, h, w = m.feature_shape(n)
    boxes = feature_boxes(geo, h, w, n)
    torch.manual_seed(0)
    for i, j in [(0, 0), (h // 2, w // 3), (h - 1, w - 1), (1, w - 2)]:
        support = torch.zeros(n, n, dtype=torch.bool)
        for _ in range(3):
            x = torch.rand(1, 3, n, n, dtype=torch.float64, requires_grad=True)
            m.double()
            m.stem(x)[0, :, i, j].sum().backward()
            support |= x.grad[0].abs().sum(0) > 0
        m.float()
        r0, c0, r1, c1 = boxes[i, j].tolist()
        box = torch.zeros(n, n, dtype=torch.bool)
        box[r0 : r1 + 1, c0 : c1 + 1] = True
        assert not (support & ~box).any(), "a pixel outside the computed receptive field moves the feature"
        rows, cols = support.nonzero().unbind(1)
        assert (rows.min(), cols.min(), rows.max(), cols.max()) == (r0, c0, r1, c1)


@pytest.mark.parametrize("arch,layer,n", CASES)
def test_pixels_inside_window_change_nothing_outside_footprint(arch, layer, n):
    m = spread_model(arch, layer)
    geo = m.geometry()
    _, h, w = m.feature_shape(n)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, n, n, generator=g)
    with torch.no_grad():
        f = m.stem(x)
        for side in (1, 3, 7):
            for _ in range(5):
                r0, c0 = torch.randint(0, n - side + 1, (2,), generator=g).tolist()
                box = torch.tensor([[r0, c0, r0 + side - 1, c0 + side - 1]])
                x2 = x.clone()
                x2[..., r0 : r0 + side, c0 : c0 + side] = torch.rand(3, side, side, generator=g)
                out = ~rect_masks(footprint(geo, box, h, w), h, w)[0]
                assert torch.equal(m.stem(x2)[0][:, out], f[0][:, out])


def test_region_is_union_of_fields():
    geo = Geometry(2, 5, 1)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = True
    r = region(geo, mask, 8)
    assert r.sum() == 25 and r[1:6, 3:8].all()


def test_unknown_module_is_refused():
    with pytest.raises(ValueError, match="receptive field"):
        module_geometry(torch.nn.Linear(3, 3))
