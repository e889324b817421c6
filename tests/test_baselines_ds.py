"""De-randomized Smoothing (column ablation) and PG-Mask-DS: ablation, hand-computed votes and
certificates (ties included), Delta by exhaustive count, exhaustive soundness of both aggregations
and of the certificates on a hand-built model, checkpoint integrity and training."""

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from scalecert.attacks import apply_patch
from scalecert.audit import patch_positions
from scalecert.baselines.smoothing import (
    VOTE_EPS,
    DSVotes,
    affected_bands,
    band_logits,
    certify_ds,
    certify_pg_mask_ds,
    column_ablate,
    default_band,
    default_threshold,
    delta,
    ds_certificate,
    ds_model,
    ds_predict,
    ds_vote_set,
    ds_votes,
    load_ds,
    pg_mask_certificate,
    pg_mask_counts,
    pg_mask_predict,
    train_ds,
    train_step,
    vote_bounds,
    window_sums,
)
from scalecert.data import ImageSet
from scalecert.models import load_model, save_checkpoint


class ColourNet(nn.Module):
    """Hand-built base classifier on 6-channel ablated inputs: class c scores the largest "excess" of colour c
    (x_c minus the mean of the other two channels) over the kept pixels, times ``scale``; ``mode="mean"``
    scores the mean colour of the kept pixels instead."""

    def __init__(self, scale: float = 20.0, mode: str = "max"):
        super().__init__()
        self.scale, self.mode = scale, mode

    def forward(self, z):
        rgb, kept = z[:, :3], (z[:, :3] + z[:, 3:]).sum(1, keepdim=True) > 0.5
        if self.mode == "mean":
            return self.scale * (rgb * kept).sum((2, 3)) / kept.sum((2, 3)).clamp(min=1)
        excess = rgb - (rgb.sum(1, keepdim=True) - rgb) / 2
        return self.scale * excess.masked_fill(~kept, -1e9).amax((2, 3))


def column_images(cols: list[list[float]], n: int) -> torch.Tensor:
    """Return one n x n image whose column j has the colour cols[j] (n colours)."""
    return torch.tensor(cols, dtype=torch.float32).T[:, None, :].expand(3, n, n).clone()


# --------------------------------------------------------------------------- ablation
def test_column_ablate_encoding_and_wrap():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=g)
    z = column_ablate(x, torch.tensor([1, 5]), 3)
    assert z.shape == (2, 6, 5, 7)
    kept = [{1, 2, 3}, {5, 6, 0}]  # the second band wraps around the right edge
    for b in range(2):
        for j in range(7):
            if j in kept[b]:
                assert torch.equal(z[b, :3, :, j], x[b, :, :, j]) and torch.equal(z[b, 3:, :, j], 1 - x[b, :, :, j])
            else:
                assert (z[b, :, :, j] == 0).all()
    assert torch.equal(column_ablate(x, 1, 3)[0], z[0]) and torch.equal(column_ablate(x[1], 5, 3)[0], z[1])
    # a kept black pixel differs from an ablated one
    assert column_ablate(torch.zeros(1, 3, 4, 4), 0, 1)[0, 3:, :, 0].eq(1).all()
    for bad in (0, 8, 2.0):
        with pytest.raises(ValueError):
            column_ablate(x, 0, bad)
    with pytest.raises(ValueError):
        column_ablate(x, torch.tensor([0.5, 1.0]), 2)
    assert (default_band(32), default_band(299), default_band(224), default_threshold(32), default_threshold(224)) == (
        4,
        25,
        19,
        0.3,
        0.2,
    )


# --------------------------------------------------------------------------- (1) hand-computed votes
def test_votes_of_hand_built_model_match_hand_computed():
    # columns: red, red, green, blue, blue, blue; band 2 (wrapping); the model scores the band's mean colour
    r, gr, bl = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]
    x = column_images([r, r, gr, bl, bl, bl], 6)[None]
    model = ColourNet(scale=10.0, mode="mean")
    logits = band_logits(model, x, band=2)
    # band s covers columns s, s+1 (mod 6): means (1,0,0) (.5,.5,0) (0,.5,.5) (0,0,1) (0,0,1) (.5,0,.5)
    expected = 10 * torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [0, 0, 1], [0, 0, 1], [0.5, 0, 0.5]])
    assert torch.allclose(logits[0], expected)
    top = ds_votes(model, x, band=2, threshold=None)  # argmax, exact ties to the smaller class
    assert top.sum(-1).eq(1).all()
    assert top[0].float().argmax(-1).tolist() == [0, 0, 1, 2, 2, 0]
    assert top.sum(1).tolist() == [[3, 1, 2]]
    thr = ds_votes(model, x, band=2, threshold=0.3)  # the half-half bands vote for both colours
    assert [set(torch.nonzero(row).flatten().tolist()) for row in thr[0]] == [{0}, {0, 1}, {1, 2}, {2}, {2}, {0, 2}]
    assert thr.sum(1).tolist() == [[3, 2, 4]]
    assert torch.equal(ds_votes(model, x, band=2, threshold="paper"), thr)  # 0.3 for a 6 px image
    assert torch.equal(ds_votes(model, x, band=2, threshold=0.3, chunk=4), thr)  # chunking changes nothing
    with pytest.raises(ValueError):
        ds_votes(model, x, band=2, threshold=1.5)
    with pytest.raises(ValueError):
        ds_votes(model, x)  # no band and no ds_band buffer


# --------------------------------------------------------------------------- (2) hand-made certificates
@pytest.mark.parametrize(
    "counts,label,d,flag",
    [
        ([5, 3, 0], 0, 1, True),  # 5 >= 3 + 2 (c = 1 > y: ties go to y)
        ([3, 5, 0], 1, 1, False),  # 5 > 3 + 2 fails (c = 0 < y would win the tie)
        ([2, 5, 0], 1, 1, True),
        ([0, 5, 3], 1, 1, True),  # 5 >= 3 + 2 with c = 2 > y
        ([0, 4, 3], 1, 1, False),
        ([5, 3, 0], 1, 1, False),  # not even the prediction
        ([2, 2, 0], 0, 0, True),  # Delta = 0: the tie goes to class 0
        ([2, 2, 0], 1, 0, False),
        ([9, 0, 0], 0, 5, False),  # 9 < 0 + 10
    ],
)
def test_ds_certificate_hand_made(counts, label, d, flag):
    c = torch.tensor([counts])
    assert ds_certificate(c, [label], d).tolist() == [flag]


def test_ds_predict_breaks_ties_to_the_smaller_class():
    assert ds_predict(torch.tensor([[2, 2, 0], [0, 3, 3], [1, 0, 1]])).tolist() == [0, 1, 0]


def votes_of(rows: list[list[int]]) -> torch.Tensor:
    """Return votes (1, n, C) from per-class 0/1 sequences (C rows of n)."""
    return torch.tensor(rows, dtype=torch.bool).T[None]


def test_pg_mask_hand_made():
    # n = 6, Delta = 2: class 0 votes at 0..3, class 1 at 4, 5
    v = votes_of([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    assert window_sums(v.long().transpose(1, 2), 2)[0].tolist() == [[2, 2, 2, 1, 0, 1], [0, 0, 0, 1, 2, 1]]
    assert pg_mask_counts(v, 2).tolist() == [[2, 0]] and pg_mask_predict(v, 2).tolist() == [0]
    ok, margin = pg_mask_certificate(v, [0], 2)
    # W0 = {0, 1}: L = 4 - |{0,1} u {2,3}| = 0, U_1 = 2 - 0 = 2 -> margin -2
    assert ok.tolist() == [False] and margin.tolist() == [-2]
    # one class everywhere (n = 10, Delta = 2): L = 10 - 4 = 6, U = 0
    ok, margin = pg_mask_certificate(votes_of([[1] * 10, [0] * 10]), [0], 2)
    assert ok.tolist() == [True] and margin.tolist() == [6]
    # an exact tie (n = 6, Delta = 1): y votes everywhere, L = 6 - 2 = 4; c votes at 0..3, U_c = 4 at W0 in {4, 5}
    tie = [[1] * 6, [1, 1, 1, 1, 0, 0]]
    ok0, m0 = pg_mask_certificate(votes_of(tie), [0], 1)  # c = 1 > y = 0: the tie goes to y
    ok1, m1 = pg_mask_certificate(votes_of(tie[::-1]), [1], 1)  # c = 0 < y = 1: the tie goes to c
    assert (ok0.tolist(), ok1.tolist(), m0.tolist(), m1.tolist()) == ([True], [False], [0], [0])
    # Delta >= n: everything masked, class 0 by the tie rule
    assert pg_mask_predict(votes_of([[0, 1, 1], [1, 1, 1]]), 5).tolist() == [0]


def rewritten_predictions(votes, patterns, w0, d):
    """Return the DS and PG-Mask-DS predictions (B, P) of votes (B, n, C) with bands w0 rewritten by each pattern."""
    b, n, c = votes.shape
    adv = votes[:, None].repeat(1, len(patterns), 1, 1)
    adv[:, :, w0] = patterns[None]
    adv = adv.view(-1, n, c)
    return ds_predict(adv.sum(1)).view(b, -1), pg_mask_predict(adv, d).view(b, -1)


def test_aggregations_sound_against_every_vote_change():
    """Exhaustive adversary on random votes: every window W0 of Delta positions, every way of rewriting the
    votes (all classes) there; certified images keep their prediction under DS and under PG masking."""
    g = torch.Generator().manual_seed(1)
    n, c, d, b = 6, 3, 2, 300
    v = torch.rand(b, n, c, generator=g) < torch.rand(b, 1, c, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    ds_ok = ds_certificate(v.sum(1), y, d) & (ds_predict(v.sum(1)) == y)
    pg_ok, _ = pg_mask_certificate(v, y, d)
    pg_ok &= pg_mask_predict(v, d) == y
    assert 0 < ds_ok.sum() < b and 0 < pg_ok.sum() < b
    patterns = torch.tensor(list(itertools.product([False, True], repeat=d * c))).view(-1, d, c)  # 64
    for t in range(n):
        ds_pred, pg_pred = rewritten_predictions(v, patterns, [(t + k) % n for k in range(d)], d)
        assert (ds_pred[ds_ok] == y[ds_ok, None]).all()
        assert (pg_pred[pg_ok] == y[pg_ok, None]).all()
    # the DS bound is tight for unconstrained votes: some uncertified, correctly predicted image flips
    assert ((ds_predict(v.sum(1)) == y) & ~ds_ok).any()


def test_vote_bounds_hand_made():
    e = VOTE_EPS
    logits = (
        torch.tensor(
            [
                [0.3 + e / 2, 0.5, 0.2 - e / 2],  # one probability just above theta = 0.3
                [0.6, 0.35, 0.05],  # nothing near a decision
                [0.3 - e / 2, 0.5, 0.2 + e / 2],
            ]
        )
        .double()
        .log()
    )
    low, high = vote_bounds(logits, 0.3)
    votes = ds_votes_from(logits, 0.3)
    assert votes.tolist() == [[True, True, False], [True, True, False], [False, True, False]]
    assert low.tolist() == [[False, True, False], [True, True, False], [False, True, False]]
    assert high.tolist() == [[True, True, False], [True, True, False], [True, True, False]]
    # argmax votes: a top-2 gap under 2 eps makes both classes possible and neither certain
    logits = torch.tensor([[0.4, 0.4 - e, 0.2 + e], [0.6, 0.3, 0.1]]).double().log()
    low, high = vote_bounds(logits, None)
    assert ds_votes_from(logits, None).tolist() == [[True, False, False], [True, False, False]]
    assert low.tolist() == [[False, False, False], [True, False, False]]
    assert high.tolist() == [[True, True, False], [True, False, False]]
    assert torch.equal(vote_bounds(logits, None, eps=0)[0], ds_votes_from(logits, None))
    with pytest.raises(ValueError):
        vote_bounds(logits, 0.3, eps=-1e-3)


def ds_votes_from(logits, threshold):
    from scalecert.baselines.smoothing import votes_from_logits

    return votes_from_logits(logits, threshold)


def test_certificates_use_the_float_noise_bounds():
    # DS: n_y = 5 vs n_c = 3 at Delta = 1 is certified (c > y); one fragile vote for c makes n_c up to 4
    c, hi = torch.tensor([[5, 3, 0]]), torch.tensor([[5, 4, 0]])
    assert ds_certificate(c, [0], 1).tolist() == [True] and ds_certificate(c, [0], 1, upper=hi).tolist() == [False]
    assert ds_certificate(c - torch.tensor([[1, 0, 0]]), [0], 1, upper=c).tolist() == [False]  # a fragile y vote
    # PG-Mask-DS: y everywhere (n = 10, Delta = 2): L = 6; c's fragile votes raise U_c
    v = votes_of([[1] * 10, [0] * 10])
    up = votes_of([[1] * 10, [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]])
    assert pg_mask_certificate(v, [0], 2, upper=up)[1].tolist() == [6 - 4]
    with pytest.raises(ValueError):
        pg_mask_certificate(v, [0], 2, upper=up[:, :5])


def test_aggregations_sound_under_float_noise_and_every_vote_change():
    """Votes outside the patch's window may take any value between the low and high bounds (float noise),
    inside it anything: certificates computed with the bounds hold; computed on the votes alone they break."""
    g = torch.Generator().manual_seed(2)
    n, c, d, b, draws = 6, 3, 2, 300, 12
    v = torch.rand(b, n, c, generator=g) < torch.rand(b, 1, c, generator=g)
    fragile = torch.rand(b, n, c, generator=g) < 0.08
    low, high = v & ~fragile, v | fragile
    y = torch.randint(0, c, (b,), generator=g)
    ds_ok = ds_certificate(low.sum(1), y, d, upper=high.sum(1)) & (ds_predict(v.sum(1)) == y)
    pg_ok = pg_mask_certificate(low, y, d, upper=high)[0] & (pg_mask_predict(v, d) == y)
    exact_ds = ds_certificate(v.sum(1), y, d) & (ds_predict(v.sum(1)) == y)
    exact_pg = pg_mask_certificate(v, y, d)[0] & (pg_mask_predict(v, d) == y)
    assert 0 < ds_ok.sum() < exact_ds.sum() and 0 < pg_ok.sum() < exact_pg.sum()
    patterns = torch.tensor(list(itertools.product([False, True], repeat=d * c))).view(-1, d, c)  # 64
    broken = {"DS": 0, "PG": 0}
    for t in range(n):
        for _ in range(draws):  # one float-noise draw between the bounds outside W0, every pattern inside
            noisy = torch.where(fragile, torch.rand(b, n, c, generator=g) < 0.5, v)
            ds_pred, pg_pred = rewritten_predictions(noisy, patterns, [(t + k) % n for k in range(d)], d)
            assert (ds_pred[ds_ok] == y[ds_ok, None]).all()
            assert (pg_pred[pg_ok] == y[pg_ok, None]).all()
            broken["DS"] += int((ds_pred[exact_ds] != y[exact_ds, None]).any(1).sum())
            broken["PG"] += int((pg_pred[exact_pg] != y[exact_pg, None]).any(1).sum())
    assert broken["DS"] > 0 and broken["PG"] > 0, broken  # the bounds are needed: exact certificates break


def test_vote_set_matches_votes_and_is_checked_by_certify():
    r, gr, bl = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]
    x = column_images([r, r, gr, bl, bl, bl], 6)[None].repeat(2, 1, 1, 1)
    model = ColourNet(scale=10.0, mode="mean")
    vs = ds_vote_set(model, x, band=2, threshold=None)
    assert isinstance(vs, DSVotes) and (vs.band, vs.threshold) == (2, None)
    assert torch.equal(vs.votes, ds_votes(model, x, band=2, threshold=None))
    assert (vs.low <= vs.votes).all() and (vs.votes <= vs.high).all()
    # the exact ties of bands 1, 2 and 5 (means (.5, .5, 0), (0, .5, .5), (.5, 0, .5)) are fragile
    assert (vs.low != vs.high).any(-1)[0].tolist() == [False, True, True, False, False, True]
    df = certify_ds(model, x, [0, 2], 1, band=2, threshold=None, votes=vs)
    assert df.fragile_bands.tolist() == [3, 3]
    assert df.equals(certify_ds(model, x, [0, 2], 1, band=2, threshold=None).assign(seconds=df.seconds))
    assert vs.batch(slice(1, 2)).shape == (1, 6, 3)
    # certify takes y's evidence from low and the others' from high: exact votes certify, the bounds do not
    v = votes_of([[1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6])
    hi = votes_of([[1] * 6, [1, 1, 1, 0, 1, 0], [0] * 6])
    for fn in (certify_ds, certify_pg_mask_ds):
        exact = fn(model, x[:1], [0], 1, band=2, threshold=None, votes=v)
        noisy = fn(model, x[:1], [0], 1, band=2, threshold=None, votes=DSVotes(v, v, hi, 2, None))
        assert exact.certified.tolist() == [True] and noisy.certified.tolist() == [False]
        assert (exact.pred.tolist(), noisy.fragile_bands.tolist()) == ([0], [3])
    with pytest.raises(ValueError, match="band 2 and threshold None"):
        certify_pg_mask_ds(model, x, [0, 2], 1, band=3, threshold=None, votes=vs)
    with pytest.raises(ValueError, match="threshold"):
        certify_ds(model, x, [0, 2], 1, band=2, threshold=0.3, votes=vs)


# --------------------------------------------------------------------------- (3) Delta, exhaustively
@pytest.mark.parametrize("n,band,p", [(8, 2, 3), (8, 4, 1), (6, 3, 5), (32, 4, 5), (12, 12, 2)])
def test_delta_counts_changed_band_inputs(n, band, p):
    g = torch.Generator().manual_seed(n + band + p)
    x = torch.rand(1, 3, n, n, generator=g) * 0.4
    starts = torch.arange(n)
    base = column_ablate(x.expand(n, -1, -1, -1), starts, band)
    d = delta(n, p, band)
    assert d == min(n, p + band - 1)
    for col in range(n - p + 1):
        xp = x.clone()
        xp[..., col : col + p] = 0.9  # differs from x at every patch pixel
        changed = (column_ablate(xp.expand(n, -1, -1, -1), starts, band) != base).flatten(1).any(1)
        assert int(changed.sum()) == d
        assert torch.nonzero(changed).flatten().tolist() == affected_bands(n, col, p, band).tolist()
        # ... and they form one circular window of Delta consecutive starts
        first = (col - band + 1) % n
        assert set(torch.nonzero(changed).flatten().tolist()) == {(first + k) % n for k in range(d)}


# --------------------------------------------------------------------------- (4) soundness on a model
def two_colour_images(b: int, n: int, gen: torch.Generator):
    """Images whose first k columns have colour A and the rest colour B (random k, A != B), with noise;
    the label is the colour of the majority of columns."""
    a = torch.randint(0, 3, (b,), generator=gen)
    bb = (a + torch.randint(1, 3, (b,), generator=gen)) % 3
    k = torch.randint(0, n + 1, (b,), generator=gen)
    eye = torch.eye(3)
    ca, cb = 0.1 + 0.7 * eye[a], 0.1 + 0.7 * eye[bb]
    left = torch.arange(n)[None, :] < k[:, None]  # (b, n)
    x = torch.where(left[:, None, None, :], ca[:, :, None, None], cb[:, :, None, None])
    x = (x + 0.1 * torch.rand(b, 3, n, n, generator=gen)).clamp(0, 1)
    return x, torch.where(2 * k >= n, a, bb)


def test_certificates_survive_exhaustive_patch_audit():
    """DS and PG-Mask-DS on the hand-built model: every patch position x six contents (zeros, ones, pure
    red/green/blue, noise) leaves the defended prediction of every certified image unchanged."""
    n, band, p, theta = 16, 2, 2, 0.3
    d = delta(n, p, band)
    g = torch.Generator().manual_seed(3)
    x, y = two_colour_images(20, n, g)
    model = ColourNet(20.0)
    corners = patch_positions(n, p)  # every one of the 15 x 15 positions
    gp = torch.Generator().manual_seed(4)
    eye = torch.eye(3)[:, :, None, None].expand(3, 3, p, p)
    contents = [torch.zeros(3, p, p), torch.ones(3, p, p), *eye]
    cache = {}

    def audit_votes(i):  # votes of all 6 x 225 patched copies of image i, shared by both defences
        if i not in cache:
            xs = x[i].expand(len(corners), -1, -1, -1)
            patched = torch.cat(
                [apply_patch(xs, c, corners) for c in contents]
                + [apply_patch(xs, torch.rand(len(corners), 3, p, p, generator=gp), corners)]
            )
            cache[i] = ds_votes(model, patched, band, theta, chunk=4096)
        return cache[i]

    for defense, certify, defended in (
        ("DS", certify_ds, lambda v: ds_predict(v.sum(1))),
        ("PG-Mask-DS", certify_pg_mask_ds, lambda v: pg_mask_predict(v, d)),
    ):
        df = certify(model, x, y, p, band=band, threshold=theta, chunk=256)
        assert (df.defense == defense).all() and (df.kind == "recovery").all() and not df.alert.any()
        assert (df.forwards == n).all() and (df.delta == d).all() and (df.patch_px == p).all()
        cert = torch.tensor(df.certified.values)
        assert cert.any() and (~cert).any(), f"{defense}: the test needs certified and non-certified images"
        assert (torch.tensor(df.clean_correct.values) | ~cert).all()
        audited = 0
        for i in cert.nonzero().flatten().tolist():
            preds = defended(audit_votes(i))
            assert (preds == y[i]).all(), f"{defense}: certified image {i} flipped"
            audited += len(preds)
        assert audited == 6 * 225 * int(cert.sum())
        # the audit has teeth: the same patches flip some correctly classified, non-certified image
        weak = (~cert & torch.tensor(df.clean_correct.values)).nonzero().flatten().tolist()
        assert weak and any((defended(audit_votes(i)) != y[i]).any() for i in weak), defense


# --------------------------------------------------------------------------- input checks
def test_bad_inputs_raise():
    model = ColourNet()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    for kwargs in (
        {"images": torch.rand(2, 1, 8, 8)},
        {"images": x * 2},
        {"images": x.int()},
        {"labels": torch.tensor([0, 3])},
        {"labels": torch.tensor([0])},
        {"patch": 9},
        {"patch": 0},
        {"band": 0},
        {"band": 9},
        {"threshold": 0.0},
        {"batch_size": 0},
    ):
        args = {"images": x, "labels": y, "patch": 2, "band": 2, "threshold": 0.3, **kwargs}
        for fn in (certify_ds, certify_pg_mask_ds):
            with pytest.raises(ValueError):
                fn(
                    model,
                    args["images"],
                    args["labels"],
                    args["patch"],
                    band=args["band"],
                    threshold=args["threshold"],
                    batch_size=kwargs.get("batch_size", 64),
                )
    with pytest.raises(ValueError):
        certify_ds(model, x, y, 2, band=2, votes=torch.zeros(2, 7, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        ds_certificate(torch.tensor([[1, 2]]), [0], -1)
    with pytest.raises(ValueError):
        pg_mask_certificate(torch.zeros(1, 4, 2), [0], 1)  # votes must be boolean


# --------------------------------------------------------------------------- (5) checkpoints
def test_loader_round_trip_and_rejects_tampered_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = ds_model("resnet20", 10, 4).eval()
    assert m.units[0][0].in_channels == 6 and m.arch == "ds_resnet20"
    path = tmp_path / "ds_tiny.pt"
    card = save_checkpoint(m, path, {"name": "ds_tiny"})
    loaded = load_ds(path)
    assert int(loaded.ds_band) == 4 and loaded.card["sha256"] == card["sha256"]
    z = column_ablate(torch.rand(2, 3, 32, 32), 3, 4)
    with torch.no_grad():
        assert torch.allclose(loaded(z), m.half().float()(z), atol=1e-4)
    with pytest.raises(ValueError):
        load_model(path)  # the generic loader must not mistake it for a 3-channel model
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_ds(path)


# --------------------------------------------------------------------------- (6) training
def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = ds_model("resnet20", 3, 2)
    x, y = two_colour_images(32, 16, g)
    starts = torch.randint(0, 16, (32,), generator=g)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    before, _ = train_step(m, opt, x, y, 2, starts=starts)
    from scalecert.baselines.smoothing import ds_loss

    with torch.no_grad():
        after = ds_loss(m, x, y, starts, 2)[0].item()
    assert after < before


def test_train_ds_tiny_run_writes_card_log_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(5)
    x, y = two_colour_images(60, 16, g)
    imgs, labels = (x * 255).round().to(torch.uint8).numpy(), y.numpy()
    ev_idx = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(3)])  # 3 images of each class
    tr_idx = np.setdiff1d(np.arange(60), ev_idx)
    classes = ["r", "g", "b"]
    tr = ImageSet(imgs[tr_idx], labels[tr_idx], classes, "toy", "train")
    ev = ImageSet(imgs[ev_idx], labels[ev_idx], classes, "toy", "test")
    kw = dict(
        band=2,
        epochs=1,
        batch_size=20,
        lr=0.05,
        eval_subset=0,
        cert_eval=3,
        final_cert=3,
        cert_patch=2,
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "ck",
        train_set=tr,
        eval_set=ev,
        threads=1,
    )
    card = train_ds("toy_ds", **kw)
    log = [json.loads(line) for line in (tmp_path / "runs" / "toy_ds" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"loss", "base_acc", "ds_certified_3", "pg_certified_3"} <= set(log[0])
    assert card["band"] == 2 and card["threshold"] == 0.3 and card["arch"] == "ds_resnet20"
    assert card["cert_patch_px"] == 2 and 0 <= card["ds_certified"] <= card["ds_clean"] <= 100
    model = load_ds(tmp_path / "ck" / "toy_ds.pt")
    assert int(model.ds_band) == 2 and model.num_classes == 3
    again = train_ds("toy_ds", **kw)  # resumes after the finished epoch: no new log line, same weights
    assert len((tmp_path / "runs" / "toy_ds" / "log.jsonl").read_text().splitlines()) == 1
    assert again["sha256"] == card["sha256"]
    with pytest.raises(ValueError, match="another configuration"):
        train_ds("toy_ds", **dict(kw, lr=0.01))


def test_training_interrupted_mid_epoch_resumes_to_the_same_weights(tmp_path):
    from scalecert.runstate import Interrupted

    g = torch.Generator().manual_seed(5)
    x, y = two_colour_images(60, 16, g)
    tr = ImageSet((x * 255).round().to(torch.uint8).numpy(), y.numpy(), ["r", "g", "b"], "toy", "train")
    kw = dict(
        band=2,
        epochs=1,
        batch_size=20,
        lr=0.05,
        eval_subset=0,
        cert_eval=0,
        final_cert=3,
        cert_patch=2,
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "ck",
        train_set=tr,
        eval_set=tr,
        threads=1,
    )
    whole = train_ds("whole", **kw)
    with pytest.raises(Interrupted, match="step 2 of epoch 1"):  # 3 steps: the band draws of steps 1-2 are skipped
        train_ds("cut", **kw, stop_after=2)
    assert train_ds("cut", **kw)["sha256"] == whole["sha256"]
