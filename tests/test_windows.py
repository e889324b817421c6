import pytest
import torch

from scalecert.windows import (
    candidate_windows,
    covers_all_patches,
    family_label,
    mask_set,
    merge_per_image,
    patch_pixels,
)


def test_paper_patch_rounding():
    assert [patch_pixels(p, 224) for p in (1.0, 2.0, 3.0, 5.0, 8.0)] == [23, 32, 39, 50, 64]
    assert [patch_pixels(p, 32) for p in (0.4, 2.4, 5.0, 8.0)] == [2, 5, 7, 9]
    assert patch_pixels(5, 32) == 5


@pytest.mark.parametrize("bad", [0, -1, 33, 101.0, float("nan"), "5"])
def test_bad_patch_is_rejected(bad):
    with pytest.raises(ValueError, match="patch"):
        patch_pixels(bad, 32)


@pytest.mark.parametrize("n,patches", [(32, (0.4, 2.4, 5.0, 8.0)), (224, (1.0, 2.0, 3.0, 5.0, 8.0))])
@pytest.mark.parametrize("tau", [None, 0.6, 0.5, 0.3])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_every_patch_lies_inside_a_window(n, patches, tau, r):
    for p in patches:
        fam = candidate_windows(n, p, r, tau)
        assert covers_all_patches(fam)
        assert (fam.boxes[:, 2:] < n).all() and (fam.boxes[:, :2] >= 0).all()
        assert fam.boxes[:, 2].max() == n - 1  # last position included


def test_base_family_has_r_squared_covering_windows():
    fam = candidate_windows(32, 5, 3)
    assert fam.side == 7 and len(fam) == 26 * 26
    a, b = 10, 17  # a patch at (10, 17)
    inside = (fam.boxes[:, 0] <= a) & (fam.boxes[:, 1] <= b) & (fam.boxes[:, 2] >= a + 4) & (fam.boxes[:, 3] >= b + 4)
    assert inside.sum() == 9


def test_per_image_merge_contains_every_input_window():
    fam = candidate_windows(64, 8, 3)
    g = torch.Generator().manual_seed(0)
    pick = fam.boxes[torch.rand(len(fam), generator=g) < 0.2]
    merged = merge_per_image(pick, 0.5, 64)
    assert len(merged) < len(pick)
    for r0, c0, r1, c1 in pick.tolist():
        assert ((merged[:, 0] <= r0) & (merged[:, 1] <= c0) & (merged[:, 2] >= r1) & (merged[:, 3] >= c1)).any()
    area = (merged[:, 2] - merged[:, 0] + 1) * (merged[:, 3] - merged[:, 1] + 1)
    assert (100 / area >= 0.5).all()


@pytest.mark.parametrize("n,patches", [(32, (0.4, 2.4, 5.0, 8.0)), (224, (1.0, 2.0, 3.0, 5.0, 8.0))])
def test_patchcleanser_mask_set_covers_every_patch_with_36_masks(n, patches):
    for pct in patches:
        fam = mask_set(n, pct, 6)
        p = patch_pixels(pct, n)
        assert len(fam) == 36 and fam.masks == 6 and fam.side == p + fam.stride - 1
        assert fam.stride == -(-(n - p + 1) // 6)  # ceil((n - p + 1) / k)
        assert covers_all_patches(fam), (n, pct)
        assert fam.boxes[:, 2].max() == n - 1 and (fam.boxes[:, :2] >= 0).all()
    assert family_label(mask_set(32, 2.4)) == "k=6 masks"


def test_a_mask_set_one_pixel_too_small_misses_a_patch():
    """The coverage check can fail: shrinking every mask by one pixel leaves some patch uncovered."""
    fam = mask_set(32, 5, 6)
    fam.boxes = fam.boxes.clone()
    fam.boxes[:, 2:] -= 1
    assert not covers_all_patches(fam)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_mask_count_is_rejected(bad):
    with pytest.raises(ValueError, match="masks per axis"):
        mask_set(32, 5, bad)
