import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scalecert.baselines import patchcleanser as P
from scalecert.windows import covers_all_patches, mask_set


class BoxDetector(nn.Module):
    """Logits of class 1 iff every pixel of a box is 0 in all channels (hidden), else of class 0."""

    def __init__(self, box):
        super().__init__()
        self.box, self.num_classes = box, 2
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x):
        r0, c0, r1, c1 = self.box
        hidden = (x[:, :, r0 : r1 + 1, c0 : c1 + 1] == 0).flatten(1).all(1).float()
        return torch.stack([1 - hidden, hidden], 1) + self.anchor


class BrightSegment(nn.Module):
    """Class 1 iff some horizontal run of 3 pixels has a mean brightness above 0.95, else class 0."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        m = F.avg_pool2d(x.mean(1, keepdim=True), (1, 3), stride=1).amax((1, 2, 3))
        return torch.stack([torch.full_like(m, 0.95), m], 1) + self.anchor


class BrightOrHiddenBox(BrightSegment):
    """Class 1 iff a bright segment shows (as :class:`BrightSegment`) or, when pixel (15, 15) is lit in channel 0, every
    pixel of a box is 0 (hidden); the box is wider than one mask, so only two masks together hide it."""

    def __init__(self, box):
        super().__init__()
        self.box = box

    def forward(self, x):
        r0, c0, r1, c1 = self.box
        hidden = (x[:, :, r0 : r1 + 1, c0 : c1 + 1] == 0).flatten(1).all(1) & (x[:, 0, 15, 15] > 0.5)
        logits = super().forward(x)
        return torch.stack([logits[:, 0], torch.maximum(logits[:, 1], 2.0 * hidden.float())], 1)


def box_case():
    """(model, images) where the box matters on images 0 and 1 only (pixel (15, 15) lit), 2 and 3 are certified."""
    net = BrightOrHiddenBox((1, 2, 3, 8))  # masks 0..5 and 4..9 wide (mask_set(16, 3, k=4)): two hide the box
    torch.manual_seed(0)
    x = 0.1 + 0.8 * torch.rand(4, 3, 16, 16)
    x[:2, 0, 15, 15], x[2:, 0, 15, 15] = 0.9, 0.2
    return net, x


def tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten()
    ).eval()


def brute_table(model, x, family):
    """Two-mask labels (K, K) of one image (3, n, n), every pair built by slicing, one forward each."""
    k = len(family)
    out = torch.zeros(k, k, dtype=torch.long)
    for i, j in itertools.product(range(k), range(k)):
        img = x.clone()
        for r0, c0, r1, c1 in (family.boxes[i].tolist(), family.boxes[j].tolist()):
            img[:, r0 : r1 + 1, c0 : c1 + 1] = 0.0
        with torch.no_grad():
            out[i, j] = model(img[None]).argmax(1)[0]
    return out


def algorithm_1(table):
    """PatchCleanser's Algorithm 1 on one precomputed table (K, K), written out loop by loop:
    (label, case, forwards), a second round costing K - 1 (its pair with itself is the first-round image)."""
    k = len(table)
    one = [int(table[i, i]) for i in range(k)]
    if len(set(one)) == 1:
        return one[0], 1, k
    majority = min(set(one), key=lambda c: (-one.count(c), c))  # ties to the smaller label
    forwards = k
    for i in range(k):
        if one[i] != majority:
            forwards += k - 1
            if all(int(table[i, j]) == one[i] for j in range(k)):
                return one[i], 2, forwards
    return majority, 3, forwards


# --------------------------------------------------------------------------- mask set
@pytest.mark.parametrize(
    "n,pct", [(32, 0.4), (32, 2.4), (32, 5.0), (32, 8.0), (224, 1.0), (224, 2.0), (224, 3.0), (224, 5.0), (224, 8.0)]
)
def test_mask_set_covers_every_paper_patch_size_with_36_masks(n, pct):
    family = mask_set(n, pct, k=6)
    assert covers_all_patches(family)
    assert len(family) == 36 and family.grid_shape == (6, 6) and family.masks == 6
    assert family.side == family.patch + family.stride - 1


# --------------------------------------------------------------------------- decision logic
def test_double_masking_decision_on_hand_made_tables():
    T = torch.tensor
    cases = [  # (table, pred, case, disagreers, forwards); the diagonal holds the one-mask labels
        # all one-mask labels agree: case I, no second round
        (torch.full((4, 4), 3), 3, 1, 0, 4),
        # one disagreer (mask 2, label 1) whose second round all says 1: case II, the disagreer's label
        (T([[0, 0, 1, 0], [0, 0, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]]), 1, 2, 1, 4 + 3),
        # the same disagreer, but its pair with mask 1 says 0: case III, the majority label
        (T([[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1], [0, 0, 1, 0]]), 0, 3, 1, 4 + 3),
        # two disagreers (masks 1 and 3) that both pass: the first in mask order decides, mask 3 is never run
        (T([[0, 2, 0, 2, 0], [2, 2, 2, 2, 2], [0, 2, 0, 2, 0], [2, 2, 2, 2, 2], [0, 2, 0, 2, 0]]), 2, 2, 2, 5 + 4),
        # disagreers mask 0 (label 1) and mask 3 (label 2): mask 0's pair with mask 3 says 2, so it fails; mask 3 passes
        (T([[1, 1, 0, 2], [1, 0, 0, 2], [0, 0, 0, 2], [2, 2, 2, 2]]), 2, 2, 2, 4 + 2 * 3),
        # majority tie (two 0s, two 5s) goes to 0, so the 5s are the disagreers and both fail (with the tie to 5,
        # masks 0 and 2 would be the disagreers and pass: case II)
        (T([[0, 0, 0, 0], [0, 5, 0, 5], [0, 0, 0, 0], [0, 5, 0, 5]]), 0, 3, 2, 4 + 2 * 3),
    ]
    for t, pred, case, dis, fw in cases:
        assert torch.equal(t, t.T)
        out = P.double_masking_decision(t[None])
        got = (out["pred"].item(), out["case"].item(), out["disagreers"].item(), out["forwards"].item())
        assert got == (pred, case, dis, fw), t
        assert (pred, case, fw) == algorithm_1(t)
    with pytest.raises(ValueError, match="symmetric"):
        P.double_masking_decision(T([[[0, 1], [0, 0]]]))


def test_double_masking_decision_matches_algorithm_1_on_random_tables():
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for k in range(2, 8):  # 50 tables of each size, decided as one batch
        t = torch.randint(0, 3, (50, k, k), generator=gen)
        t = torch.triu(t) + torch.triu(t, 1).transpose(1, 2)
        unanimous = torch.rand(50, k, generator=gen) < 0.4  # some masks get a unanimous row: case II candidates
        for b, i in unanimous.nonzero().tolist():
            t[b, i, :] = t[b, :, i] = t[b, i, i].clone()
        out = P.double_masking_decision(t)
        got = list(zip(out["pred"].tolist(), out["case"].tolist(), out["forwards"].tolist()))
        assert got == [algorithm_1(tb) for tb in t]
        seen |= set(out["case"].tolist())
    assert seen == {1, 2, 3}


# --------------------------------------------------------------------------- certificate on a hand-built model
@pytest.mark.parametrize(
    "box,certified,pred,case",
    [
        ((10, 10, 12, 12), False, 1, 2),  # one mask hides the box: every mask holding it flips to 1 and passes
        ((1, 2, 7, 12), False, 0, 1),  # 7 x 11: no one mask hides it (first round agrees), two adjacent masks do
        ((6, 6, 25, 25), True, 0, 1),  # 20 x 20: no two masks hide it
    ],
)
def test_certificate_equals_brute_force_over_all_mask_pairs(box, certified, pred, case):
    torch.manual_seed(1)
    x = 0.1 + 0.9 * torch.rand(1, 3, 32, 32)  # no pixel is 0 unless a mask hides it
    model = BoxDetector(box)
    family = mask_set(32, 5, k=6)
    brute = brute_table(model, x[0], family)
    table, leads = P.pair_table(model, x, family, chunk=50)
    assert torch.equal(table[0], brute)
    df = P.certify_patchcleanser(model, x, [0], 5, k=6, batch_size=1, ids=[7], early_exit=False)
    fast = P.certify_patchcleanser(model, x, [0], 5, k=6, batch_size=1, ids=[7]).iloc[0]
    row = df.iloc[0]
    assert (fast.certified, fast.pred, fast.case, fast.forwards) == (row.certified, row.pred, row.case, row.forwards)
    assert bool(row.certified) == bool((brute == 0).all()) == certified
    assert (row.pred, row.case, row.forwards) == (pred, case, algorithm_1(brute)[2]) == algorithm_1(brute)
    assert row.wrong_pairs == int((brute != 0).triu().sum())
    assert (row.id, row.kind, row.guarantee, row.alert, row.masks) == (7, "recovery", "recovery", False, 36)
    assert row.certify_forwards == 36 * 37 // 2
    run = P.double_masking(model, x, 5, k=6)
    assert (run["pred"].item(), run["forwards"].item()) == (row.pred, row.forwards)


# --------------------------------------------------------------------------- inference vs table, soundness
def test_double_masking_run_round_by_round_equals_the_decision_on_the_pair_table():
    net = tiny_net(3)
    x = torch.rand(6, 3, 16, 16)
    family = mask_set(16, 3, k=4)
    table, _ = P.pair_table(net, x, family, chunk=37)
    want = P.double_masking_decision(table)
    got = P.double_masking(net, x, family=family, chunk=23)
    for key in ("pred", "case", "disagreers", "forwards"):
        assert torch.equal(got[key], want[key]), key
    assert set(got["case"].tolist()) >= {2, 3}  # the seed exercises both second-round outcomes


def _patched(x, p, gen):
    """Every p x p patch position of one image (3, n, n), each with zeros, ones and uniform noise."""
    n = x.shape[-1]
    out = []
    for content in (torch.zeros(3, p, p), torch.ones(3, p, p), torch.rand(3, p, p, generator=gen)):
        for r, c in itertools.product(range(n - p + 1), repeat=2):
            a = x.clone()
            a[:, r : r + p, c : c + p] = content
            out.append(a)
    return torch.stack(out)


@pytest.mark.parametrize("make", ["random conv net", "bright-segment detector", "bright segment or hidden box"])
def test_certified_images_keep_their_label_under_every_patch_position(make):
    if make == "random conv net":
        net = tiny_net(7)
        torch.manual_seed(7)
        x = torch.rand(6, 3, 16, 16)
    elif make == "bright segment or hidden box":  # images 0 and 1 are beaten at some position (test below)
        net, x = box_case()
    else:  # every clean image is certified; a patch of ones fools the bare model wherever it is not wholly hidden
        net = BrightSegment()
        torch.manual_seed(0)
        x = 0.9 * torch.rand(2, 3, 16, 16)
    p, family = 3, mask_set(16, 3, k=4)
    y = P.double_masking(net, x, family=family)["pred"]
    df = P.certify_patchcleanser(net, x, y, p, k=4)
    certified = df.index[df.certified].tolist()
    assert len(certified) > 0
    gen = torch.Generator().manual_seed(0)
    flipped = worked = 0
    for i in certified:
        attacked = _patched(x[i], p, gen)
        out = P.double_masking(net, attacked, family=family)
        assert (out["pred"] == y[i]).all(), i
        with torch.no_grad():
            flipped += int((net(attacked).argmax(1) != y[i]).sum())
        worked += int((out["case"] > 1).sum())
    assert flipped > 0 and worked > 0  # the patches do fool the undefended net and make double masking work


def test_exhaustive_positions_catch_a_certificate_that_skips_the_two_mask_images():
    """On images whose one-mask labels are all right but one two-mask image is wrong, some patch position does beat
    double masking: the exhaustive search above would catch a certificate that checked the first round only."""
    (net, x), family = box_case(), mask_set(16, 3, k=4)
    y = P.double_masking(net, x, family=family)["pred"]
    assert y.tolist() == [0, 0, 0, 0]
    table, _ = P.pair_table(net, x, family)
    assert (table.diagonal(dim1=1, dim2=2) == 0).all()  # a first-round-only certificate would hold on all four
    assert P.certify_patchcleanser(net, x, y, 3, k=4).certified.tolist() == [False, False, True, True]
    gen = torch.Generator().manual_seed(0)
    beaten = [bool((P.double_masking(net, _patched(x[i], 3, gen), family=family)["pred"] != 0).any()) for i in range(4)]
    assert beaten == [True, True, False, False]


# --------------------------------------------------------------------------- harness
def test_patchcleanser_runs_through_the_peer_harness(tmp_path, monkeypatch):
    from scalecert import results as R
    from scalecert.baselines import harness as H

    pc = H.peer("PatchCleanser")
    assert pc.kind == "recovery" and pc.name not in H.PEER_NAMES and pc.name in H.EXTRA_PEER_NAMES
    assert pc.checkpoint("cifar10") == "cifar10_resnet20_vanilla"
    assert pc.checkpoint("imagenette") == "imagenette_resnet18w16_vanilla"
    net = tiny_net(1)
    net.card = {"sha256": "0" * 64}
    # k = 3 (9 masks, 45 pairs per image) keeps the run short
    fake = H.dataclasses.replace(
        pc,
        loader=lambda name, device="cpu": net,
        checkpoints={"cifar10": "tiny"},
        certify=functools.partial(P.certify_patchcleanser, k=3),
    )
    monkeypatch.setattr(H, "_peers", lambda: {"PatchCleanser": fake})
    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    df = H.peer_cached("PatchCleanser", "cifar10", 2.4, per_class=1, chunk_images=5, progress=False)
    assert len(df) == 10 and (df.defense == "PatchCleanser").all() and (df.guarantee == "recovery").all()
    assert (df.certify_forwards == 9 * 10 // 2).all() and (df.patch_px == 5).all() and (df.masks == 9).all()
    assert ((df.forwards >= 9) & (df.forwards <= 9 + 8 * df.disagreers)).all()
    assert (~df.certified | df.clean_correct).all()  # a certified image's defended output is its label
    names = []  # another checkpoint than the peer's own: the occlusion-trained twin, say
    other = H.dataclasses.replace(fake, loader=lambda name, device="cpu": names.append(name) or net)
    monkeypatch.setattr(H, "_peers", lambda: {"PatchCleanser": other})
    H.peer_cached("PatchCleanser", "cifar10", 2.4, per_class=1, chunk_images=5, progress=False, checkpoint="twin")
    assert names == ["twin"]


def test_early_exit_certifies_and_predicts_as_the_full_pair_table():
    net = tiny_net(5)
    torch.manual_seed(5)
    x = torch.rand(12, 3, 16, 16)
    y = P.double_masking(net, x, 3, k=4)["pred"]
    y[::4] = (y[::4] + 1) % 3  # some images whose label is not the defended output: not certifiable
    full = P.certify_patchcleanser(net, x, y, 3, k=4, batch_size=5, early_exit=False)
    fast = P.certify_patchcleanser(net, x, y, 3, k=4, batch_size=5)
    same = ["id", "label", "pred", "clean_correct", "certified", "forwards", "case", "disagreers", "certify_forwards"]
    assert full[same].equals(fast[same])
    assert 0 < fast.certified.sum() < len(fast)  # the seed gives both outcomes
    n_pairs = 16 * 17 // 2
    assert (full.pairs_evaluated == n_pairs).all() and (fast.pairs_evaluated[fast.certified] == n_pairs).all()
    early = fast.pairs_evaluated < n_pairs
    assert early.any() and fast.wrong_pairs[early].isna().all() and (fast.wrong_pairs[fast.certified] == 0).all()
    done = ~early
    assert (fast.wrong_pairs[done] == full.wrong_pairs[done]).all()
    assert (fast.min_lead[fast.certified] == full.min_lead[fast.certified]).all()


class Counting(nn.Module):
    """Wraps a model and counts the images it evaluates."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


@pytest.mark.parametrize("early_exit", [True, False])
def test_evaluations_count_every_network_evaluation_of_the_run(early_exit):
    torch.manual_seed(3)
    x = torch.rand(12, 3, 16, 16)
    x[-2:] = 0.0  # masks hide nothing there: every pair has the image's own label, so it certifies
    net = tiny_net(3)
    family = mask_set(16, 3, k=4)
    table, _ = P.pair_table(net, x, family, chunk=64)
    # labels: the pair table's label of pair (0, 1) (the black images certify, some others leave in a group of pairs),
    # another label for two images (they leave after the first round)
    y = table[:, 0, 1].clone()
    y[:2] = (y[:2] + 1) % 3
    per_image = []
    for i in range(len(x)):
        counted = Counting(net)
        df = P.certify_patchcleanser(counted, x[i : i + 1], y[i : i + 1], 3, k=4, chunk=64, early_exit=early_exit)
        per_image.append((counted.images, int(P.evaluations(df).iloc[0]), int(df.pairs_evaluated.iloc[0])))
    spent, counted_by_formula, pairs = zip(*per_image)
    assert list(counted_by_formula) == list(spent)
    if early_exit:  # the fixture reaches the three ways an image ends
        assert 16 in pairs and 136 in pairs and any(16 < p < 136 for p in pairs), pairs  # k = 4: 16 masks
    else:
        assert set(spent) == {136}
        # records cached before the early exit have no pairs_evaluated: they evaluated the whole table
        assert (P.evaluations(df.drop(columns="pairs_evaluated")) == 136).all()
