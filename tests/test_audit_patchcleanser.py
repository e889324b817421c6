"""The PatchCleanser soundness audit (issue #36 item 4): sound on tiny models, catches a broken defence, cached."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scalecert import audit as A
from scalecert.baselines import patchcleanser as P
from scalecert.windows import mask_set


class BrightSegment(nn.Module):
    """Class 1 iff some horizontal run of 3 pixels has a mean brightness above 0.95, else class 0: a patch of ones
    fools it wherever the patch is not wholly hidden, and every image darker than 0.95 is certified for class 0."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        m = F.avg_pool2d(x.mean(1, keepdim=True), (1, 3), stride=1).amax((1, 2, 3))
        return torch.stack([torch.full_like(m, 0.95), m], 1) + self.anchor


class Airplanes(BrightSegment):
    """Ten classes, always class 0 (CIFAR-10's airplane), its runner-up class 1 by the brightest 3-pixel run."""

    def forward(self, x):
        bright = super().forward(x)[:, 1]
        return torch.cat([torch.stack([2.0 + 0 * bright, bright], 1), torch.zeros(len(x), 8) + self.anchor], 1)


def tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten()
    ).eval()


def _case(make):
    if make == "bright-segment detector":
        torch.manual_seed(0)
        return BrightSegment(), 0.9 * torch.rand(2, 3, 16, 16)
    torch.manual_seed(7)
    return tiny_net(7), torch.rand(6, 3, 16, 16)


KW = dict(k=4, stride=1, attack_stride=3, attack_steps=3, progress=False)  # every position of a 3 px patch
POSITIONS = 14 * 14 * 3 + 6 * 6  # zeros, ones and noise everywhere; the attack at 0, 3, ..., 12, 13 per axis


@pytest.mark.parametrize("make", ["bright-segment detector", "random conv net"])
def test_every_position_and_content_keeps_the_label_of_every_certified_image(make):
    net, x = _case(make)
    y = P.double_masking(net, x, 3, k=4)["pred"]
    res = A.audit_patchcleanser(net, x, y, 3, **KW)
    assert res["certified"] > 0 and res["cases"] == res["certified"] * POSITIONS
    assert res["violations"] == 0 and res["examples"] == []
    assert res["flipped"] > 0  # the patches do fool the undefended model: the audit proves something
    assert res["second_round"] > 0  # and double masking has to work for it


def test_the_attack_fools_the_bare_model_and_never_optimises_through_a_mask_that_holds_the_patch():
    net, x = _case("bright-segment detector")
    only_attack = A.audit_patchcleanser(
        net, x, torch.zeros(2, dtype=torch.long), 3, contents=("attack",), **{**KW, "attack_steps": 5}
    )
    assert only_attack["flipped"] > 0 and only_attack["violations"] == 0
    family = mask_set(16, 3, 4)
    corners = torch.tensor([[0, 0], [13, 13], [6, 7]])
    holds = [
        sum(int(b[0] <= a and b[1] <= c and b[2] >= a + 2 and b[3] >= c + 2) for b in family.boxes.tolist())
        for a, c in corners.tolist()
    ]
    assert min(holds) >= 1  # every patch lies wholly inside some mask
    seen = []

    def spy(xp):
        seen.append(xp.detach())
        return net(xp)

    xp = A.paste(x[0], torch.ones(3, 3, 3), corners)  # the image's pixels are > 0, the patch's are 1
    out = A.patchcleanser_attack_loss(family, corners, max_masks=None)(spy, xp, torch.zeros(3, dtype=torch.long))
    assert out.shape == (3,) and x.min() > 0
    per_image = [len(family) - h for h in holds]  # the masked images come image by image
    assert len(seen[0]) == sum(per_image)
    start = 0
    for i, count in enumerate(per_image):
        a, b = corners[i].tolist()
        for img in seen[0][start : start + count]:
            assert (img == 0).any() and (img[:, a : a + 3, b : b + 3] != 0).any()  # masked, but the patch still shows
        start += count
    seen.clear()
    A.patchcleanser_attack_loss(family, corners, max_masks=4)(spy, xp, torch.zeros(3, dtype=torch.long))
    assert len(seen[0]) == 12  # at most 4 sampled masks per image


def test_a_broken_defence_is_caught(monkeypatch):
    net, x = _case("bright-segment detector")
    y = torch.zeros(2, dtype=torch.long)
    honest = A.audit_patchcleanser(net, x, y, 3, **KW)

    def plain_model(model, images, patch=None, k=P.PAPER_K, family=None, chunk=None, device=None, fill=P.FILL):
        with torch.no_grad():
            pred = model(images).argmax(1).cpu()
        ones = torch.ones_like(pred)
        return {"pred": pred, "case": ones, "disagreers": 0 * ones, "forwards": ones}

    monkeypatch.setattr(P, "double_masking", plain_model)  # "double masking" that returns the bare model's output
    broken = A.audit_patchcleanser(net, x, y, 3, **KW)
    assert broken["certified"] == honest["certified"] > 0  # the certificate is the pair table's, not the broken run
    assert broken["violations"] == broken["flipped"] == honest["flipped"] > 0
    assert broken["examples"] and broken["examples"][0]["pred"] == 1


def test_uncertified_images_get_no_cases():
    net = BrightSegment()
    x = 0.9 * torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x[1, :, 5:8, 5:16] = 1.0  # a bright bar no two masks hide: class 1 everywhere
    df = A.audit_records_patchcleanser(
        net, x, torch.zeros(2, dtype=torch.long), 3, k=4, ids=[10, 11], stride=4, contents=("zeros",), progress=False
    )
    assert df.id.tolist() == [10, 11] and df.certified.tolist() == [True, False]
    assert df.cases.tolist() == [25, 0] and (df.violations == 0).all()


def test_audit_patchcleanser_cached_reads_the_harness_certificates_matches_the_direct_audit_and_resumes(
    tmp_path, monkeypatch
):
    import functools

    from scalecert import experiments as E
    from scalecert import results as R
    from scalecert.baselines import harness as H

    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    net = Airplanes()  # certifies the one image of class 0 among the 10
    net.card = {"sha256": "0" * 64}
    pc = H.peer("PatchCleanser")  # k = 3 (9 masks, 45 pairs per image) keeps the run short
    fake = H.dataclasses.replace(
        pc, loader=lambda name, device="cpu": net, certify=functools.partial(P.certify_patchcleanser, k=3)
    )
    monkeypatch.setattr(H, "_peers", lambda: {"PatchCleanser": fake})
    monkeypatch.setattr(E, "load_model", lambda name, device="cpu": net)
    kw = dict(per_class=1, k=3, stride=9, attack_stride=27, attack_steps=1, attack_masks=4, progress=False)
    a = E.audit_patchcleanser_cached("cifar10", "tiny", 2.4, **kw)
    cert = H.peer_cached("PatchCleanser", "cifar10", 2.4, per_class=1, progress=False, checkpoint="tiny")  # read back
    x, y, ids = E.eval_images("cifar10", 1)
    direct = A.audit_records_patchcleanser(
        net, x, y, 2.4, k=3, ids=ids, stride=9, attack_stride=27, attack_steps=1, attack_masks=4, progress=False
    )
    assert list(a.id) == ids and a.certified.tolist() == cert.certified.tolist() == (y == 0).tolist()
    cols = ["id", "label", "certified", "cases", "flipped", "violations", "second_round"]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), direct[cols], check_dtype=False)
    assert (a.cases > 0).tolist() == a.certified.tolist() and a.violations.sum() == 0
    config = json.loads((Path(a.attrs["cache"]) / "config.json").read_text())
    assert (config["kind"], config["defense"], config["masks"]) == ("audit", "PatchCleanser", 3)
    assert config["certificates"] == Path(cert.attrs["cache"]).name
    monkeypatch.setattr(A, "audit_records_patchcleanser", lambda *a_, **k: pytest.fail("recomputed a cached image"))
    pd.testing.assert_frame_equal(a, E.audit_patchcleanser_cached("cifar10", "tiny", 2.4, **kw))
    with pytest.raises(ValueError, match="use 9 masks, not 6 x 6"):
        E.audit_patchcleanser_cached("cifar10", "tiny", 2.4, **{**kw, "k": 6})
