"""IBP patch certification (Chiang et al. 2020): bound soundness, a hand-computed case, certificate
soundness by exhaustive audit, position enumeration, checkpoint integrity and training."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scalecert.attacks import apply_patch, pgd_patch
from scalecert.baselines.ibp import (
    IBPNet,
    certify_ibp,
    ibp_cnn,
    ibp_cost,
    ibp_loss,
    interval_bounds,
    interval_propagate,
    load_ibp,
    margin_bounds,
    patch_box,
    ramp_schedule,
    train_ibp,
    train_step,
)
from scalecert.data import ImageSet
from scalecert.models import save_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests are many small ops: one thread is fastest, and far faster on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def colour_images(b, n, gen):
    """Images whose class (0..2) is the dominant colour channel, with a random gap and pixel noise."""
    y = torch.randint(0, 3, (b,), generator=gen)
    base = 0.2 + 0.3 * torch.rand(b, 3, generator=gen)
    base[torch.arange(b), y] += 0.5 * torch.rand(b, generator=gen)
    x = base[:, :, None, None] + 0.1 * (torch.rand(b, 3, n, n, generator=gen) - 0.5)
    return x.clamp(0, 1), y


def tiny_net(n=16, seed=0):
    torch.manual_seed(seed)
    layers = [
        nn.Conv2d(3, 8, 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 4, 2, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * (n // 4) ** 2, 32),
        nn.ReLU(),
        nn.Linear(32, 3),
    ]
    return IBPNet(layers, n, 3, "tiny")


@pytest.fixture(scope="module")
def trained():
    """A tiny net trained for 80 IBP steps (about a second) on the colour task with 2 x 2 patches."""
    m = tiny_net()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for s in range(80):
        x, y = colour_images(64, 16, g)
        eps, kappa = ramp_schedule(s, 80, 0.05, 0.5, 0.3, power=1.0)
        train_step(m, opt, x, y, 2, eps, kappa, g, k=2)
    return m.eval()


def margins_of(logits, y):
    return logits.gather(1, y[:, None]) - logits


# --------------------------------------------------------------------------- (1) bound soundness
@pytest.mark.parametrize("eps", [1.0, 0.3])
def test_bounds_contain_logits_of_sampled_inputs_and_box_corners(eps):
    torch.manual_seed(1)
    m = ibp_cnn("ibp_small", 16, 10).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g)
    y = torch.tensor([3, 7])
    p = 3
    corners = torch.tensor([[0, 0], [13, 13], [5, 9], [0, 13]])
    lower = margin_bounds(m, x, y, corners, p, eps=eps)  # (2, 4, 10)
    assert lower.shape == (2, 4, 10) and (lower.gather(2, y.view(2, 1, 1).expand(-1, 4, 1)) == 0).all()
    checked = 0
    for i in range(2):
        for k, c in enumerate(corners):
            cs = c.expand(128, 2)
            lo, hi = patch_box(x[i].expand(128, -1, -1, -1), cs, p, eps)
            u = torch.rand(128, 3, 16, 16, generator=g)
            u[64:] = (u[64:] < 0.5).float()  # box corners: every patch pixel at one end of its range
            xs = lo + u * (hi - lo)
            assert torch.equal(xs[:, :, : c[0], :], x[i].expand(128, -1, -1, -1)[:, :, : c[0], :])  # outside unchanged
            with torch.no_grad():
                logits = m(xs)
                llo, lhi = interval_bounds(m, lo, hi)
            assert (logits >= llo - 1e-4).all() and (logits <= lhi + 1e-4).all()
            true = margins_of(logits, torch.full((128,), int(y[i])))
            assert (true >= lower[i, k] - 1e-4).all()
            naive = llo[0, y[i]] - lhi[0]
            naive[y[i]] = 0
            assert (lower[i, k] >= naive - 1e-4).all()  # elision is at least as tight
            checked += 128
    assert checked == 1024


def test_zero_width_box_gives_exact_margins():
    torch.manual_seed(3)
    m = ibp_cnn("ibp_small", 16, 10).eval()
    x, y = torch.rand(3, 3, 16, 16), torch.tensor([0, 4, 9])
    lower = margin_bounds(m, x, y, torch.tensor([[2, 2]]), 4, eps=0.0)[:, 0]
    with torch.no_grad():
        assert torch.allclose(lower, margins_of(m(x), y), atol=1e-4)


# --------------------------------------------------------------------------- (2) hand-computed case
def test_hand_computed_linear_relu_interval_and_elision():
    lin1, lin2 = nn.Linear(3, 2), nn.Linear(2, 2)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]]))
        lin1.bias.copy_(torch.tensor([0.5, -1.0]))
        lin2.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0]]))
        lin2.bias.copy_(torch.tensor([0.25, 0.0]))
    # x in [0, 1]^3: centre W mu + b = (0, 0.5), radius |W| 0.5 = (1.5, 2.5)
    lo, hi = interval_propagate(nn.Sequential(lin1, nn.ReLU()), torch.zeros(1, 3), torch.ones(1, 3))
    assert torch.allclose(lo, torch.tensor([[0.0, 0.0]])) and torch.allclose(hi, torch.tensor([[1.5, 3.0]]))
    # the same through an IBPNet on 1 x 1 images, the patch covering the whole image
    m = IBPNet([nn.Flatten(), lin1, nn.ReLU(), lin2], n=1, num_classes=2, mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.full((2, 3, 1, 1), 0.3)
    lower = margin_bounds(m, x, torch.tensor([0, 1]), "all", 1)[:, 0]
    # y=0: (W0 - W1) h + 0.25 = -h1 + 2 h2 + 0.25 on h in [0, 1.5] x [0, 3] -> -1.25 (naive: 0.25 - 3 = -2.75)
    # y=1: h1 - 2 h2 - 0.25 -> -6.25
    assert torch.allclose(lower, torch.tensor([[0.0, -1.25], [-6.25, 0.0]]))
    llo, lhi = interval_bounds(m, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    assert torch.allclose(llo, torch.tensor([[0.25, -3.0]])) and torch.allclose(lhi, torch.tensor([[4.75, 3.0]]))


# --------------------------------------------------------------------------- (3) certificate soundness
def test_certificates_survive_exhaustive_patch_audit(trained):
    g = torch.Generator().manual_seed(5)
    x, y = colour_images(24, 16, g)
    p = 2
    df = certify_ibp(trained, x, y, p, early_stop=False)
    cert = torch.tensor(df.certified.values)
    assert cert.any() and (~cert).any(), "the test needs certified and non-certified images"
    assert (df.defense == "IBP").all() and (df.kind == "recovery").all() and not df.alert.any()
    assert (df.forwards == 1 + 2 * 15**2).all()
    assert ((df.worst_bound > 0) == df.certified).all()
    corners = torch.cartesian_prod(torch.arange(15), torch.arange(15))
    lower = margin_bounds(trained, x, y, corners, p)
    gp = torch.Generator().manual_seed(6)
    audited = 0
    for i in cert.nonzero().flatten().tolist():
        xs = x[i].expand(len(corners), -1, -1, -1)
        ys = torch.full((len(corners),), int(y[i]))
        contents = [torch.zeros(3, p, p), torch.ones(3, p, p), torch.rand(len(corners), 3, p, p, generator=gp)]
        patched = [apply_patch(xs, c, corners) for c in contents]
        patched.append(pgd_patch(trained, xs, ys, p, corners, steps=4, step_size=0.3, seed=i)[0])
        for xp in patched:
            with torch.no_grad():
                logits = trained(xp)
            assert (logits.argmax(1) == ys).all()
            assert (margins_of(logits, ys) >= lower[i] - 1e-4).all()  # each position within its own bound
            audited += len(xp)
    assert audited == 4 * 225 * int(cert.sum())
    # the audit has teeth: the same attack flips some correctly classified, non-certified image
    flips = 0
    for i in (~cert & torch.tensor(df.clean_correct.values)).nonzero().flatten().tolist():
        xs, ys = x[i].expand(len(corners), -1, -1, -1), torch.full((len(corners),), int(y[i]))
        xp = pgd_patch(trained, xs, ys, p, corners, steps=4, step_size=0.3, seed=i)[0]
        with torch.no_grad():
            flips += (trained(xp).argmax(1) != ys).sum().item()
    assert flips > 0


def test_certify_early_stop_agrees_and_saves_work(trained):
    x, y = colour_images(24, 16, torch.Generator().manual_seed(5))
    full = certify_ibp(trained, x, y, 2, early_stop=False)
    fast = certify_ibp(trained, x, y, 2, chunk=32, batch_size=7)
    assert (full.certified.values == fast.certified.values).all()
    assert (fast.forwards <= full.forwards).all() and (fast.forwards < full.forwards).any()
    assert (fast.forwards[~fast.clean_correct] == 1).all()


# --------------------------------------------------------------------------- (4) positions
def test_all_positions_are_enumerated_including_corners(trained):
    x, y = colour_images(1, 16, torch.Generator().manual_seed(0))
    assert margin_bounds(trained, x, y, "all", 3).shape == (1, 14 * 14, 3)
    from scalecert.baselines.ibp import _corners

    c = _corners("all", 32, 5)
    assert len({tuple(v) for v in c.tolist()}) == 28 * 28 == len(c)
    for corner in ([0, 0], [0, 27], [27, 0], [27, 27]):
        assert corner in c.tolist()
    assert c.min() == 0 and c.max() == 27
    # 2.4 % of a 32 x 32 image is the paper's 5 x 5 patch
    torch.manual_seed(0)
    df = certify_ibp(ibp_cnn("ibp_small", 32, 10), torch.rand(1, 3, 32, 32), [2], 2.4, early_stop=False)
    assert df.positions.iloc[0] == 784 and df.forwards.iloc[0] == 1 + 2 * 784 and df.patch_px.iloc[0] == 5


def test_bad_inputs_raise_value_error(trained):
    x, y = colour_images(2, 16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        certify_ibp(trained, x * 2, y, 2)
    with pytest.raises(ValueError):
        certify_ibp(trained, x[:, :, :8], y, 2)
    with pytest.raises(ValueError):
        certify_ibp(trained, x, torch.tensor([0, 5]), 2)
    with pytest.raises(ValueError):
        certify_ibp(trained, x, y, 17)
    with pytest.raises(ValueError):
        certify_ibp(trained, x, y, 2, positions=[[15, 0]])
    with pytest.raises(ValueError):
        certify_ibp(trained, x, y, 2, margin=-1.0)
    with pytest.raises(ValueError):
        margin_bounds(trained, x, y, "some", 2)
    with pytest.raises(ValueError):
        ibp_cnn("nope")


# --------------------------------------------------------------------------- (5) checkpoints
def synthetic_set(b, n, seed, split):
    x, y = colour_images(b, n, torch.Generator().manual_seed(seed))
    return ImageSet((x * 255).round().to(torch.uint8).numpy(), y.numpy(), ["r", "g", "b"], "synthetic", split)


def test_train_resume_save_load_and_tamper(tmp_path):
    tr, ev = synthetic_set(48, 16, 0, "train"), synthetic_set(30, 16, 1, "test")
    ev.labels = np.repeat([0, 1, 2], 10)  # balanced for the class-balanced subsets
    kw = dict(
        patch=2,
        epochs=2,
        batch_size=16,
        cert_eval=3,
        final_cert=6,
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "ckpt",
        train_set=tr,
        eval_set=ev,
        threads=0,
    )
    card = train_ibp("t", **kw)
    log = [json.loads(line) for line in (tmp_path / "runs" / "t" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["eps"] > 0
    assert card["defense"] == "IBP" and card["patch_px"] == 2 and card["certified_images"] == 6
    card_path = tmp_path / "ckpt" / "t.json"
    card_path.write_text(json.dumps(dict(json.loads(card_path.read_text()), note="hand-written")))
    again = train_ibp("t", **kw)  # finished and final: nothing is trained or evaluated again, the card stays
    assert len((tmp_path / "runs" / "t" / "log.jsonl").read_text().splitlines()) == 2
    assert again["sha256"] == card["sha256"] and again["note"] == "hand-written"
    assert json.loads(card_path.read_text())["note"] == "hand-written"
    with pytest.raises(ValueError):
        train_ibp("t", **dict(kw, patch=3))
    path = tmp_path / "ckpt" / "t.pt"
    m = load_ibp(path)
    assert m.n == 16 and m.num_classes == 3 and m.card["sha256"] == card["sha256"]
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_ibp(path)
    other = tmp_path / "other.pt"
    save_checkpoint(ibp_cnn("ibp_small", 16, 3), other, {"name": "other"})
    other.with_suffix(".json").unlink()
    with pytest.raises(ValueError):
        load_ibp(other)


# --------------------------------------------------------------------------- (6) training
def test_one_training_step_lowers_the_loss():
    m = tiny_net(seed=4)
    x, y = colour_images(64, 16, torch.Generator().manual_seed(7))
    corners = torch.randint(0, 15, (64, 3, 2), generator=torch.Generator().manual_seed(8))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    before, _ = ibp_loss(m, x, y, corners, 2, 0.5, 0.5)
    opt.zero_grad()
    before.backward()
    opt.step()
    after, stats = ibp_loss(m, x, y, corners, 2, 0.5, 0.5)
    assert after.item() < before.item() and stats["robust_ce"] >= F.cross_entropy(m(x), y).item() - 1e-4


def test_ramp_schedule_and_cost_estimate():
    assert ramp_schedule(0, 100) == (0.0, 1.0) and ramp_schedule(15, 100) == (0.0, 1.0)
    eps, kappa = ramp_schedule(25, 100, warmup=0.05, ramp=0.4, kappa_end=0.5, power=1.0)
    assert eps == pytest.approx(0.5) and kappa == pytest.approx(0.75)
    eps, kappa = ramp_schedule(40, 100, warmup=0.15, ramp=0.5, kappa_end=0.5, power=2.0)
    assert eps == pytest.approx(0.25) and kappa == pytest.approx(0.75)
    assert ramp_schedule(100, 100, kappa_end=0.2) == (1.0, pytest.approx(0.2))
    cost = ibp_cost(32, 2.4, sample=4, repeats=1)
    assert cost["positions"] == 784 and cost["forwards_per_image"] == 1569
    assert cost["seconds_per_image"] == pytest.approx(cost["plain_forward_seconds"] + 784 * cost["seconds_per_pass"])


def test_training_interrupted_mid_epoch_resumes_to_the_same_weights(tmp_path):
    from scalecert.runstate import Interrupted

    tr, ev = synthetic_set(48, 16, 0, "train"), synthetic_set(30, 16, 1, "test")
    ev.labels = np.repeat([0, 1, 2], 10)
    kw = dict(
        patch=2,
        epochs=2,
        batch_size=16,
        cert_eval=0,
        final_cert=3,
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "ckpt",
        train_set=tr,
        eval_set=ev,
        threads=1,
    )
    whole = train_ibp("whole", **kw)
    with pytest.raises(Interrupted, match="step 1 of epoch 2"):
        train_ibp("cut", **kw, stop_after=4)  # 3 steps per epoch: stops inside epoch 2
    cut = train_ibp("cut", **kw)
    assert cut["sha256"] == whole["sha256"]
    logs = [
        [json.loads(x) for x in (tmp_path / "runs" / n / "log.jsonl").read_text().splitlines()]
        for n in ("whole", "cut")
    ]
    for a, b in zip(*logs, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_a_smaller_patch_is_certified_wherever_a_larger_one_is(trained):
    """A p x p patch lies inside some (p + 1) x (p + 1) patch, and interval bounds only widen with the box."""
    x, y = colour_images(24, 16, torch.Generator().manual_seed(11))
    cert = {p: certify_ibp(trained, x, y, p).certified.to_numpy() for p in (1, 2, 3)}
    assert cert[2].any() and not cert[3].all()  # the property is tested on images that tell the sizes apart
    assert (cert[1] >= cert[2]).all() and (cert[2] >= cert[3]).all()
