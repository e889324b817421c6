from pathlib import Path

import pandas as pd
import pytest
import torch

from scalecert import results as R
from scalecert.baselines import harness as H
from scalecert.baselines.bagnet import BagNet, load_bagnet
from scalecert.baselines.patchguard import certify_pgpp
from scalecert.models import save_checkpoint


def test_every_peer_of_table_2_is_registered():
    table = pd.read_csv(Path(__file__).resolve().parent.parent / "data" / "paper" / "table2_certified.csv")
    peers = set(table.defense) - {"ScaleCert", "MR"}
    assert peers == set(H.PEER_NAMES)
    for name in H.PEER_NAMES:
        p = H.peer(name)
        assert p.kind == table[table.defense == name].kind.iloc[0]
        for ds in set(table[table.defense == name].dataset):
            assert p.checkpoint({"imagenet": "imagenette"}.get(ds, ds)) is not None, (name, ds)
    assert H.peer("IBP").checkpoint("imagenette") is None  # CIFAR only, as in the paper
    # shared work is keyed by its function: every lookup must return the same one, or nothing is ever reused
    assert H.peer("DS").shared is H.peer("PG-Mask-DS").shared is H.peer("DS").shared is not None
    assert H.peer("CBN").shared is H.peer("PatchGuard++").shared is H.peer("PG-Mask-BN").shared is not None
    with pytest.raises(ValueError, match="unknown peer"):
        H.peer("NoSuchDefence")


def test_peer_cached_computes_once_then_reads_the_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "tiny_bagnet.pt"
    save_checkpoint(BagNet("bagnet11_cifar", 10), path, {"name": "tiny_bagnet"})
    fake = H.Peer("PatchGuard++", "detection", load_bagnet, certify_pgpp, {"cifar10": str(path)})
    monkeypatch.setattr(H, "_peers", lambda: {"PatchGuard++": fake})
    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    a = H.peer_cached("PatchGuard++", "cifar10", 2.4, per_class=1, chunk_images=4, progress=False)
    assert len(a) == 10 and (a.defense == "PatchGuard++").all()
    (run,) = (tmp_path / "cache").iterdir()
    assert len(list(run.glob("chunk-*.csv"))) == 3  # 10 images in chunks of 4
    stamp = {p: p.stat().st_mtime_ns for p in run.glob("chunk-*.csv")}
    b = H.peer_cached("PatchGuard++", "cifar10", 2.4, per_class=1, chunk_images=4, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert stamp == {p: p.stat().st_mtime_ns for p in run.glob("chunk-*.csv")}  # nothing recomputed
    # another version of the certificate is another configuration: computed afresh, beside the first
    monkeypatch.setattr(H, "_peers", lambda: {"PatchGuard++": H.dataclasses.replace(fake, version=2)})
    c = H.peer_cached("PatchGuard++", "cifar10", 2.4, per_class=1, chunk_images=4, progress=False)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert (c.config_key != a.config_key).all()
    assert c[["id", "pred", "certified"]].equals(a[["id", "pred", "certified"]])
    row = H.summarise_peer(b, patch_pct=2.4)
    assert row["images"] == 10 and row["forwards_per_image"] == 1.0
    assert row["certified"] <= row["clean"]  # a detection certificate implies a correct, alert-free output


def _peer_checkpoints():
    import json

    from scalecert.models import ARCHS, CHECKPOINT_DIR

    out = []
    for p in sorted(CHECKPOINT_DIR.glob("*.pt")):
        card = json.loads(p.with_suffix(".json").read_text())
        if card["arch"] not in ARCHS:
            out.append(p.stem)
    return out


@pytest.mark.parametrize("name", _peer_checkpoints())
def test_peer_card_accuracy_holds_on_a_subset(name):
    """Each shipped peer checkpoint loads (sha256 checked) and its card's accuracy holds on 200 seeded images
    (7 points)."""
    from scalecert import data as D
    from scalecert.baselines.ibp import clean_accuracy
    from scalecert.baselines.smoothing import base_accuracy
    from scalecert.train import evaluate

    peers = [p for p in H._peers().values() if name in p.checkpoints.values()]
    assert peers, f"{name} is shipped but no peer of the harness uses it"
    model = peers[0].loader(name)
    card = model.card
    ds = D.load_dataset(card["dataset_key"], "eval")
    idx = ds.subset(20, seed=123)
    if card["arch"].startswith("ds_"):
        acc, ref = base_accuracy(model, ds, idx), card["base_accuracy"]
    elif card["arch"].startswith("ibp"):
        acc, ref = clean_accuracy(model, ds, idx), card["clean_accuracy"]
    else:
        acc, ref = evaluate(model, ds, idx), card["clean_accuracy"]
    assert abs(acc - ref) <= 7.0, (acc, ref)


def test_ds_votes_are_computed_once_and_charged_to_every_configuration(tmp_path, monkeypatch):
    from scalecert.baselines import smoothing as S

    torch.manual_seed(0)
    path = tmp_path / "tiny_ds.pt"
    save_checkpoint(S.ds_model("resnet20", 10, 4), path, {"name": "tiny_ds"})
    calls = []

    def counted(model, x, device):
        calls.append(len(x))
        return {"votes": S.ds_votes(model, x, device=device)}

    peers = {
        n: H.Peer(n, "recovery", S.load_ds, f, {"cifar10": str(path)}, counted)
        for n, f in (("DS", S.certify_ds), ("PG-Mask-DS", S.certify_pg_mask_ds))
    }
    monkeypatch.setattr(H, "_peers", lambda: peers)
    monkeypatch.setattr(H, "_SHARED", {})
    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    got = {
        (n, pct): H.peer_cached(n, "cifar10", pct, per_class=1, chunk_images=5, progress=False)
        for n in ("DS", "PG-Mask-DS")
        for pct in (0.4, 2.4)
    }
    assert calls == [5, 5]  # one vote pass per chunk of images, for 4 configurations
    model = S.load_ds(path)
    from scalecert import data as D
    from scalecert.experiments import eval_ids

    ds = D.load_dataset("cifar10", "eval")
    x, y = ds.tensors(eval_ids(ds, 1, 0))
    for (n, pct), df in got.items():  # same records as certifying without sharing
        alone = peers[n].certify(model, x, y, pct, ids=eval_ids(ds, 1, 0))
        cols = [c for c in alone.columns if c != "seconds"]
        pd.testing.assert_frame_equal(df[cols].reset_index(drop=True), alone[cols], check_dtype=False)
    first, reused = got[("DS", 0.4)].attrs["seconds_per_image"], got[("DS", 2.4)].attrs["seconds_per_image"]
    vote_secs = sum(v[1] for v in H._SHARED.values()) / 10
    assert reused >= vote_secs > 0 and first >= vote_secs  # the reusing configuration is charged the votes


def test_bagnet_logits_are_computed_once_for_the_three_bagnet_peers(tmp_path, monkeypatch):
    from scalecert.baselines import patchguard as G

    torch.manual_seed(0)
    path = tmp_path / "tiny_bagnet.pt"
    save_checkpoint(BagNet("bagnet11_cifar", 10), path, {"name": "tiny_bagnet"})
    calls = []

    def counted(model, x, device):
        calls.append(len(x))
        return {"logits": G.bagnet_logits(model, x, device=device)}

    fns = {"CBN": G.certify_cbn, "PG-Mask-BN": G.certify_pg_mask_bn, "PatchGuard++": G.certify_pgpp}
    peers = {
        n: H.Peer(
            n, "detection" if n == "PatchGuard++" else "recovery", load_bagnet, f, {"cifar10": str(path)}, counted
        )
        for n, f in fns.items()
    }
    monkeypatch.setattr(H, "_peers", lambda: peers)
    monkeypatch.setattr(H, "_SHARED", {})
    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    got = {
        (n, pct): H.peer_cached(n, "cifar10", pct, per_class=1, chunk_images=5, progress=False)
        for n in fns
        for pct in (0.4, 2.4)
    }
    assert calls == [5, 5]  # one forward pass per chunk for 6 configurations
    from scalecert import data as D
    from scalecert.experiments import eval_ids

    ds = D.load_dataset("cifar10", "eval")
    ids = eval_ids(ds, 1, 0)
    x, y = ds.tensors(ids)
    model = load_bagnet(path)
    for (n, pct), df in got.items():  # same records as certifying without sharing
        alone = fns[n](model, x, y, pct, ids=ids)
        cols = [c for c in alone.columns if c != "seconds"]
        pd.testing.assert_frame_equal(df[cols].reset_index(drop=True), alone[cols], check_dtype=False)
    with pytest.raises(ValueError, match="logits must have shape"):
        G.certify_cbn(model, x, y, 2.4, logits=torch.zeros(len(x), 10, 2, 2))
