"""BagNet geometry and the CBN / PG-Mask-BN / PatchGuard++ certificates: receptive fields from input
gradients, patch locality, certificate soundness by exhaustive audit, hand-computed cases, checkpoint
integrity and training."""

import json
import math

import pandas as pd
import pytest
import torch
from conftest import randomise_bn

from scalecert.attacks import apply_patch, pgd_patch
from scalecert.audit import patch_positions
from scalecert.baselines.bagnet import ARCHS, STATED_GEOMETRY, BagNet, load_bagnet, train_bagnet, train_step
from scalecert.baselines.patchguard import (
    DEFENSE_KINDS,
    cbn_local,
    cbn_predict,
    certify_cbn,
    certify_pg_mask_bn,
    certify_pgpp,
    clip_logits,
    feature_window,
    pg_mask_local,
    pg_mask_predict,
    pgpp_local,
    union_max,
    window_rects,
    window_sums,
)
from scalecert.data import ImageSet
from scalecert.geometry import feature_boxes, footprint, rect_masks
from scalecert.models import save_checkpoint

N, P = 16, 4  # audit setting: 16 x 16 images, 4 x 4 patches (bagnet_tiny: 8 x 8 map, 4 x 4 windows)
CBN_CLIPS = {"clamp": dict(clip="clamp", a=-1.0, b=1.0), "tanh": dict(clip="tanh", a=1.0, b=0.0)}


def test_images(seed=0, n=N, b=10):
    """Flat colours with growing pixel noise, the last four (or fewer) split into two colours (left / right)."""
    g = torch.Generator().manual_seed(seed)
    col = torch.rand(b, 3, 1, 1, generator=g)
    amp = torch.linspace(0.0, 0.6, b).view(b, 1, 1, 1)
    x = (1 - amp) * col + amp * torch.rand(b, 3, n, n, generator=g)
    x[max(0, b - 4) :, :, :, n // 2 :] = torch.rand(min(4, b), 3, 1, 1, generator=g)
    return x.clamp(0, 1)


test_images.__test__ = False  # a helper, not a test


def spread_bagnet(seed=0, classes=4):
    """A random bagnet_tiny with randomised BN statistics (conftest.randomise_bn, as for spread_model) and
    a head centred and whitened on calibration images, so that its predictions vary between images."""
    torch.manual_seed(seed)
    m = randomise_bn(BagNet("bagnet_tiny", classes))
    m.eval()
    with torch.no_grad():
        f = m.features(test_images(seed + 100, N, 64)).mean((2, 3))
        m.head.weight.data = torch.randn_like(m.head.weight) / (f.std(0) + 1e-6)
        m.head.bias.data = -(m.head.weight.data @ f.mean(0))
    return m


# --------------------------------------------------------------------------- (1) receptive field
@pytest.mark.parametrize("arch,n", [("bagnet_tiny", 16), ("bagnet11_cifar", 32), ("bagnet17_w16", 64)])
def test_stated_receptive_field_is_the_input_gradient_support(arch, n):
    torch.manual_seed(0)
    m = BagNet(arch).double().eval()
    geo = m.geometry()
    assert geo == STATED_GEOMETRY[arch]
    h, w = m.logit_shape(n)
    assert (h, w) == (n // geo.stride, n // geo.stride)
    x = torch.rand(1, 3, n, n, dtype=torch.float64, requires_grad=True)
    z = m.local_logits(x)
    boxes = feature_boxes(geo, h, w, n)
    for i, j in [(h // 2, w // 2), (0, 0), (h - 1, w - 1)]:
        (grad,) = torch.autograd.grad(
            z[0, :, i, j] @ torch.arange(1.0, 11.0, dtype=torch.float64), x, retain_graph=True
        )
        support = grad[0].abs().sum(0) > 0
        r0, c0, r1, c1 = boxes[i, j].tolist()
        expected = torch.zeros(n, n, dtype=torch.bool)
        expected[r0 : r1 + 1, c0 : c1 + 1] = True
        assert torch.equal(support, expected), (arch, i, j)
    r0, c0, r1, c1 = boxes[h // 2, w // 2].tolist()
    assert r1 - r0 + 1 == c1 - c0 + 1 == geo.rf  # the central field lies wholly inside the image


# --------------------------------------------------------------------------- (2) patch locality
@pytest.mark.parametrize("arch,n,p", [("bagnet_tiny", 16, 2), ("bagnet_tiny", 16, 5), ("bagnet11_cifar", 32, 5)])
def test_patch_changes_only_logits_in_its_footprint_which_fits_a_window(arch, n, p):
    torch.manual_seed(1)
    m = BagNet(arch).eval()
    geo = m.geometry()
    h, w = m.logit_shape(n)
    win = feature_window(geo, n, p, h)
    assert win <= math.ceil((p + geo.rf - 1) / geo.stride)
    rects = window_rects(h, w, win)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, n, n, generator=g)
    corners = torch.cat(
        [torch.tensor([[0, 0], [n - p, n - p], [0, n - p]]), torch.randint(0, n - p + 1, (9, 2), generator=g)]
    )
    with torch.no_grad():  # the same batch shape on both sides: float32 convolutions are then bit-exact
        z = m.local_logits(x.expand(len(corners), -1, -1, -1))
        patches = torch.rand(len(corners), 3, p, p, generator=g)
        zp = m.local_logits(apply_patch(x.expand(len(corners), -1, -1, -1), patches, corners))
    fps = footprint(geo, torch.cat([corners, corners + p - 1], 1), h, w)
    extents = set()
    for changed, fp in zip((zp != z).any(1), fps):  # (h, w) per patch
        inside = rect_masks(fp, h, w)[0]
        assert not (changed & ~inside).any()  # exact: nothing outside the footprint moves
        assert changed.any()
        i0, j0, i1, j1 = fp.tolist()
        extents.add(max(i1 - i0, j1 - j0) + 1)
        assert ((rects[:, 0] <= i0) & (rects[:, 1] <= j0) & (rects[:, 2] >= i1) & (rects[:, 3] >= j1)).any()
    assert max(extents) == win  # the derived window is attained, not just an upper bound


def test_feature_window_values():
    cifar, inet = BagNet("bagnet11_cifar").geometry(), BagNet("bagnet17_w16").geometry()
    # ceil((p + K - 1) / S): CIFAR K=11, S=2; Imagenette K=17, S=8
    assert [feature_window(cifar, 32, p, 16) for p in (2, 5)] == [6, 8]
    assert [feature_window(inet, 224, p, 28) for p in (23, 32, 39)] == [5, 6, 7]
    assert feature_window(cifar, 32, 32, 16) == 16  # capped at the map


# --------------------------------------------------------------------------- (3) soundness by audit
def _defended(z, y, win):
    """Return the defended outputs (B,) of every defence on local logits z (pred, -1 for an alert)."""
    out = {f"CBN-{k}": cbn_predict(z, **kw) for k, kw in CBN_CLIPS.items()}
    out["PG-Mask-BN"] = pg_mask_predict(z, win)
    out["PatchGuard++"] = pgpp_local(z, y, win)["pred"]
    return out


def _scores(name, z, win):
    """Differentiable class scores an attacker pushes for each defence."""
    if name.startswith("CBN"):
        return clip_logits(z, **CBN_CLIPS[name[4:]])[0].sum((2, 3))
    if name == "PG-Mask-BN":
        u = z.clamp(min=0)
        return u.sum((2, 3)) - window_sums(u, win).amax(2)
    return z.sum((2, 3))


def _unsound(z, y, win):
    """Deliberately unsound certificates (the audit must catch them): CBN with a quarter of the clipping
    penalty, robust masking whose true-class bound forgets that the mask removes a second window, and
    PatchGuard++ that trusts the unmasked prediction without checking the masked ones."""
    c, lo, hi = clip_logits(z.double(), "clamp", -1.0, 1.0)
    tot, ws = c.sum((2, 3)), window_sums(c, win)
    yy = y.view(-1, 1)
    m = (tot.gather(1, yy) - tot)[:, :, None] - (ws.gather(1, yy[:, :, None].expand(-1, 1, ws.shape[2])) - ws)
    m = (m - win * win * (hi - lo) / 4).scatter(1, yy[:, :, None].expand(-1, 1, m.shape[2]), float("inf"))
    u = z.double().clamp(min=0)
    tot, ws = u.sum((2, 3)), window_sums(u, win)
    upper = (tot[:, :, None] - ws).scatter(1, yy[:, :, None].expand(-1, 1, ws.shape[2]), float("-inf")).amax(1)
    lower = tot.gather(1, yy) - ws.gather(1, yy[:, :, None].expand(-1, 1, ws.shape[2]))[:, 0]
    return {
        "CBN-clamp": (cbn_predict(z, **CBN_CLIPS["clamp"]) == y) & (m.amin((1, 2)) > 0),
        "PG-Mask-BN": (pg_mask_predict(z, win) == y) & ((lower - upper).amin(1) > 0),
        "PatchGuard++": z.sum((2, 3)).argmax(1) == y,
    }


@pytest.fixture(scope="module")
def audited():
    """Two random BagNets x 10 images: certificates, and the defended outputs for every patch position x
    content (zeros, ones, uniform noise): one case per model."""
    cases = []
    for seed in (0, 1):
        m = spread_bagnet(seed)
        x = test_images(seed)
        y = m(x).argmax(1).detach()
        certs = {f"CBN-{k}": certify_cbn(m, x, y, P, **kw) for k, kw in CBN_CLIPS.items()}
        certs["PG-Mask-BN"], certs["PatchGuard++"] = certify_pg_mask_bn(m, x, y, P), certify_pgpp(m, x, y, P)
        win = int(certs["PG-Mask-BN"].window.iloc[0])
        corners = patch_positions(N, P)
        k = len(corners)
        g = torch.Generator().manual_seed(3 + seed)
        c = torch.cat([corners, corners, corners])
        outs = []
        for i in range(len(x)):
            pt = torch.cat([torch.zeros(k, 3, P, P), torch.ones(k, 3, P, P), torch.rand(k, 3, P, P, generator=g)])
            with torch.no_grad():
                z = m.local_logits(apply_patch(x[i : i + 1].expand(len(c), -1, -1, -1), pt, c))
            outs.append(_defended(z, y[i].expand(len(c)), win))
        with torch.no_grad():
            unsound = _unsound(m.local_logits(x), y, win)
        cases.append((m, x, y, certs, win, outs, unsound))
    return cases


def test_some_images_are_certified_and_some_are_not(audited):
    assert {case[4] for case in audited} == {4}  # P = 4: footprints of 4 x 4 positions
    for name in audited[0][3]:
        df = pd.concat([case[3][name] for case in audited])
        assert 2 <= df.certified.sum() <= len(df) - 2, (name, df.certified.tolist())
        defense = name.split("-clamp")[0].split("-tanh")[0]
        assert (df.defense == defense).all() and (df.kind == DEFENSE_KINDS[defense]).all()
        assert (df.forwards == 1).all()
        assert not (df.certified & ~df.clean_correct).any()  # a certificate implies a right clean output
        if df.kind.iloc[0] == "recovery":
            assert (df.margin > 0)[df.certified].all() and not df.certified[df.margin <= 0].any()
        else:
            assert (df.gap > 0)[df.certified].all() and not df.certified[df.alert].any()
    for _, _, y, certs, *_ in audited:
        assert all((df.label == y.numpy()).all() for df in certs.values())


def test_exhaustive_audit_never_breaks_a_certificate(audited):
    for _, _, y, certs, _, outs, _ in audited:
        for name, df in certs.items():
            for i, out in enumerate(outs):
                o = out[name]
                if df.certified[i]:
                    assert not ((o != y[i]) & (o != -1)).any(), (name, i)
                    if df.kind.iloc[0] == "recovery":
                        assert (o == y[i]).all(), (name, i)


def test_the_audit_catches_unsound_certificates(audited):
    """The same audit breaks deliberately loosened bounds, so the soundness test above can fail."""
    for name in ("CBN-clamp", "PG-Mask-BN", "PatchGuard++"):
        broken = sum(
            bool(unsound[name][i]) and bool(((out[name] != y[i]) & (out[name] != -1)).any())
            for _, _, y, _, _, outs, unsound in audited
            for i, out in enumerate(outs)
        )
        assert broken > 0, name


@pytest.mark.parametrize("name", ["CBN-clamp", "CBN-tanh", "PG-Mask-BN", "PatchGuard++"])
def test_gradient_patch_attack_never_breaks_a_certificate(audited, name):
    for m, x, y, certs, win, _, _ in audited:
        idx = torch.tensor([i for i in range(len(x)) if certs[name].certified[i]], dtype=torch.long)
        if len(idx) == 0:
            continue
        corners = torch.cat(
            [
                torch.tensor([[0, 0], [N - P, N - P], [N // 2, N // 2 - 1]]),
                torch.randint(0, N - P + 1, (5, 2), generator=torch.Generator().manual_seed(4)),
            ]
        )
        xs, ys = x[idx].repeat_interleave(len(corners), 0), y[idx].repeat_interleave(len(corners))

        def loss(model, xp, yy):  # push the best wrong class over the true one
            s = _scores(name, model.local_logits(xp), win)
            return s.scatter(1, yy[:, None], -1e9).amax(1) - s.gather(1, yy[:, None])[:, 0]

        xp, _ = pgd_patch(
            m, xs, ys, P, corners=corners.repeat(len(idx), 1), steps=6, step_size=0.3, seed=5, loss_fn=loss
        )
        with torch.no_grad():
            o = _defended(m.local_logits(xp), ys, win)[name]
        assert ((o == ys) | ((o == -1) & (name == "PatchGuard++"))).all()


def test_certificate_predictions_match_the_defended_predictors(audited):
    for m, x, y, certs, win, _, _ in audited:
        with torch.no_grad():
            z = m.local_logits(x)
        for k, kw in CBN_CLIPS.items():
            assert torch.equal(cbn_local(z, y, win, **kw)["pred"], cbn_predict(z, **kw))
            assert certs[f"CBN-{k}"].pred.tolist() == cbn_predict(z, **kw).tolist()
        assert torch.equal(pg_mask_local(z, y, win)["pred"], pg_mask_predict(z, win))


# --------------------------------------------------------------------------- (4) hand-computed cases
def _logits(c0, c1):
    return torch.stack([torch.as_tensor(c0, dtype=torch.float64), torch.as_tensor(c1, dtype=torch.float64)])[None]


def test_cbn_hand_computed():
    y = torch.tensor([0])

    # clamp to [0, 1], 4 x 4 map, 2 x 2 windows: margin = (S0 - S1) - (W0 - W1) - 4 * (1 - 0)
    def flat(a, b):
        return _logits(torch.full((4, 4), a), torch.full((4, 4), b))

    out = cbn_local(flat(0.75, 0.25), y, 2, "clamp", 0.0, 1.0)  # 8 - 2 - 4 = 2
    assert out["certified"].item() and out["margin"].item() == pytest.approx(2.0)
    out = cbn_local(flat(0.5, 0.25), y, 2, "clamp", 0.0, 1.0)  # 4 - 1 - 4 = -1
    assert not out["certified"].item() and out["margin"].item() == pytest.approx(-1.0)
    out = cbn_local(flat(3.0, -2.0), y, 2, "clamp", 0.0, 1.0)  # clipped to 1 / 0: 16 - 4 - 4 = 8
    assert out["certified"].item() and out["margin"].item() == pytest.approx(8.0)
    # the worst window is the one where the true class is strongest
    c0 = torch.full((4, 4), 0.5)
    c0[:2, :2] = 1.0
    out = cbn_local(_logits(c0, torch.zeros(4, 4)), y, 2, "clamp", 0.0, 1.0)  # (10 - 0) - 4 - 4 = 2
    assert out["margin"].item() == pytest.approx(2.0)


def test_pg_mask_hand_computed():
    y = torch.tensor([0])
    ones = torch.ones(4, 4)
    # class 0 uniform 1: masked 16 - 4 = 12; worst case L = 16 - 8 (two disjoint windows) = 8
    one_spike = torch.zeros(4, 4)
    one_spike[0, 0] = 5.0
    out = pg_mask_local(_logits(ones, one_spike), y, 2)  # U = 5 outside, 0 on the spike: 8 - 5 = 3
    assert out["pred"].item() == 0 and out["certified"].item() and out["margin"].item() == pytest.approx(3.0)
    two_spikes = one_spike.clone()
    two_spikes[3, 3] = 5.0
    out = pg_mask_local(_logits(ones, two_spikes), y, 2)  # U = 10 on a window missing both: 8 - 10 = -2
    assert out["pred"].item() == 0 and not out["certified"].item()
    assert out["margin"].item() == pytest.approx(-2.0)
    # negative evidence is clipped away (ReLU): the same as above
    out = pg_mask_local(_logits(ones, two_spikes - 3 * (two_spikes == 0)), y, 2)
    assert out["margin"].item() == pytest.approx(-2.0)
    # union_max of a single spike: the window holding it plus any other window
    v = torch.zeros(1, 4, 4, dtype=torch.float64)
    v[0, 1, 1] = 7.0
    assert union_max(v, 2).tolist() == [[7.0] * 9]


def test_pgpp_hand_computed():
    y = torch.tensor([0])
    ones = torch.ones(4, 4)

    def block(v):  # evidence v in the top-left 2 x 2
        return torch.nn.functional.pad(torch.full((2, 2), v), (0, 2, 0, 2))

    out = pgpp_local(_logits(ones, block(2.5)), y, 2)  # unmasked 16 vs 10; a far window: 12 vs 10 -> agree
    assert out["pred"].item() == 0 and not out["alert"].item() and out["certified"].item()
    out = pgpp_local(_logits(ones, block(3.5)), y, 2)  # unmasked 16 vs 14; a far window: 12 vs 14 -> alert
    assert out["pred"].item() == -1 and out["alert"].item() and not out["certified"].item()
    # windows touching the block mask some of class 1's evidence: exactly the 9 - 4 = 5 far-enough ones disagree
    assert out["disagree"].item() == 5
    out = pgpp_local(_logits(ones, block(2.5)), torch.tensor([1]), 2)  # right output for another label: not certified
    assert out["pred"].item() == 0 and not out["certified"].item()


# --------------------------------------------------------------------------- input checking
def test_bad_inputs_raise_value_errors():
    m = spread_bagnet(0)
    x = test_images(0, b=2)
    with pytest.raises(ValueError, match="NaN"):
        certify_cbn(m, x.clone().fill_(float("nan")), [0, 0], P)
    with pytest.raises(ValueError, match="labels"):
        certify_pg_mask_bn(m, x, [0, 9], P)
    with pytest.raises(ValueError, match="patch"):
        certify_pgpp(m, x, [0, 0], 0)
    with pytest.raises(ValueError, match="larger than"):
        certify_pgpp(m, x, [0, 0], N + 1)
    with pytest.raises(ValueError, match="clipping"):
        certify_cbn(m, x, [0, 0], P, clip="sigmoid")
    with pytest.raises(ValueError, match="a < b"):
        certify_cbn(m, x, [0, 0], P, clip="clamp", a=1.0, b=0.0)
    with pytest.raises(ValueError, match="local_logits"):
        certify_cbn(torch.nn.Linear(2, 2), x, [0, 0], P)
    with pytest.raises(ValueError, match="unknown BagNet"):
        BagNet("bagnet9000")


# --------------------------------------------------------------------------- (5) checkpoints
def test_load_bagnet_checks_the_sha256(tmp_path):
    torch.manual_seed(0)
    m = BagNet("bagnet_tiny", 4).eval()
    path = tmp_path / "tiny_bagnet.pt"
    card = save_checkpoint(m, path, {"name": "tiny_bagnet"})
    loaded = load_bagnet(path)
    x = test_images(0, b=3)
    assert loaded.arch == "bagnet_tiny" and loaded.card["sha256"] == card["sha256"]
    assert torch.allclose(loaded(x), m(x), atol=2e-2)  # fp16 weights
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_bagnet(path)
    m.head.weight.data[0, 0] = 1e6  # overflows fp16: refused when saving, nothing written
    before = path.read_bytes()
    with pytest.raises(ValueError, match="beyond ±65504 once rounded to fp16"):
        save_checkpoint(m, path, {"name": "tiny_bagnet"})
    assert path.read_bytes() == before
    path.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="no card"):
        load_bagnet(path)


# --------------------------------------------------------------------------- (6) training
def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    m = BagNet("bagnet_tiny", 3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, N, N, generator=g), torch.randint(0, 3, (32,), generator=g)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    before, _ = train_step(m, opt, x, y)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(m(x), y).item()  # same batch, train-mode BN
    assert after < before


def test_train_bagnet_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 3
    x = torch.rand(48, 3, 1, 1, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 3)[:, :, None, None] * 0.6
    x = (x.expand(-1, -1, N, N) * 255).to(torch.uint8).numpy()
    train = ImageSet(x, y.numpy(), ["a", "b", "c"], "toy", "train")
    ev = ImageSet(x[:12], y[:12].numpy(), ["a", "b", "c"], "toy", "test")
    kw = dict(
        arch="bagnet_tiny",
        epochs=1,
        batch_size=16,
        lr=0.05,
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "ckpt",
        train_set=train,
        eval_set=ev,
        command="test",
    )
    card = train_bagnet("toy_bagnet", **kw)
    assert card["geometry"] == {"stride": 2, "rf": 5, "pad": 2} and card["logit_map"] == [8, 8]
    log = (tmp_path / "runs" / "toy_bagnet" / "log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["epoch"] == 1
    model = load_bagnet(tmp_path / "ckpt" / "toy_bagnet.pt")
    assert model.card["sha256"] == card["sha256"] and model.num_classes == 3
    again = train_bagnet("toy_bagnet", **kw)  # resumes after the last epoch: nothing is trained again
    assert len((tmp_path / "runs" / "toy_bagnet" / "log.jsonl").read_text().splitlines()) == 1
    assert again["sha256"] == card["sha256"]
    with pytest.raises(ValueError, match="another configuration"):
        train_bagnet("toy_bagnet", **dict(kw, lr=0.1))
    assert set(ARCHS) >= {"bagnet11_cifar", "bagnet17_w16"}


def test_training_interrupted_mid_epoch_resumes_to_the_same_weights(tmp_path):
    from scalecert.runstate import Interrupted

    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 3
    # pixel noise, so that the random crops and flips change the batches
    x = torch.rand(48, 3, N, N, generator=g) * 0.4 + torch.nn.functional.one_hot(y, 3)[:, :, None, None] * 0.6
    x = (x * 255).to(torch.uint8).numpy()
    train = ImageSet(x, y.numpy(), ["a", "b", "c"], "toy", "train")
    ev = ImageSet(x[:12], y[:12].numpy(), ["a", "b", "c"], "toy", "test")
    kw = dict(
        arch="bagnet_tiny",
        epochs=2,
        batch_size=16,
        lr=0.05,
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "ckpt",
        train_set=train,
        eval_set=ev,
        command="test",
        threads=1,
    )
    whole = train_bagnet("whole", **kw)
    with pytest.raises(Interrupted, match="step 2 of epoch 1"):
        train_bagnet("cut", **kw, stop_after=2)
    with pytest.raises(Interrupted, match="step 1 of epoch 2"):
        train_bagnet("cut", **kw, stop_after=2)  # the rest of epoch 1, then one step of epoch 2
    assert train_bagnet("cut", **kw)["sha256"] == whole["sha256"]
    assert len((tmp_path / "runs" / "cut" / "log.jsonl").read_text().splitlines()) == 2
