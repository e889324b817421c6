import io
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from scalecert import data as D


def _write_cifar_both(tmp_path, n=20, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    with open(batches / "test_batch", "wb") as f:
        pickle.dump({"data": imgs.transpose(0, 3, 1, 2).reshape(n, -1), "labels": labels}, f)
    tree = tmp_path / "cifar10-tree"
    for i, (im, lab) in enumerate(zip(imgs, labels)):
        d = tree / "test" / D.CIFAR10_CLASSES[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:04d}.png")  # lossless, so both formats must agree exactly
    return batches, tree, imgs, labels


def test_both_cifar_formats_give_identical_tensors(tmp_path):
    batches, tree, imgs, labels = _write_cifar_both(tmp_path)
    a = D.load_dataset("cifar10", "test", root=batches)
    b = D.load_dataset("cifar10", "test", root=tree)
    xa, ya = a.tensors()
    xb, yb = b.tensors()
    # the tree lists images class by class; reorder the pickled ones the same way
    order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    assert torch.equal(xa[order], xb) and torch.equal(ya[order], yb)
    assert xa.dtype == torch.float32 and xa.min() >= 0 and xa.max() <= 1
    assert a.classes == b.classes == D.CIFAR10_CLASSES


def test_two_writers_of_the_split_cache_both_finish(tmp_path, monkeypatch):
    # a second process decodes and caches the same split while the first is between its save and its rename
    # (seen on 2026-12-06: `cache --plan` beside `make data` lost its temp file to the other writer)
    _, tree, imgs, labels = _write_cifar_both(tmp_path)
    real_replace, nested = D.os.replace, {}

    def replace_after_another_writer(src, dst):
        if "started" not in nested:
            nested["started"] = True
            nested["x"] = D.load_split(tree, "test")[0]
        return real_replace(src, dst)

    monkeypatch.setattr(D.os, "replace", replace_after_another_writer)
    x, y, _ = D.load_split(tree, "test")
    monkeypatch.setattr(D.os, "replace", real_replace)
    cached_x, cached_y, _ = D.load_split(tree, "test")
    assert np.array_equal(cached_x, x) and np.array_equal(cached_y, y) and np.array_equal(nested["x"], x)
    assert sorted(p.name for p in tree.glob(".*")) == [".test-labels.npy", ".test-uint8.npy"]
    assert oct(tree.joinpath(".test-uint8.npy").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


def test_split_cache_is_redecoded_at_another_size_and_stale_temp_files_go(tmp_path):
    _, tree, imgs, labels = _write_cifar_both(tmp_path)
    stale, fresh = tree / "..test-uint8.npy.999999-dead.tmp", tree / "..test-uint8.npy.999998-busy.tmp"
    stale.write_bytes(b"left by a killed writer")
    fresh.write_bytes(b"another writer, still at work")
    os.utime(stale, (time.time() - 7200,) * 2)
    assert D.load_split(tree, "test")[0].shape[2:] == (32, 32)
    assert not stale.exists() and fresh.exists()
    x16 = D.load_split(tree, "test", size=16)[0]
    assert x16.shape[2:] == (16, 16) and D.load_split(tree, "test", size=16)[0].shape[2:] == (16, 16)


def test_class_index_is_sorted_folder_name(tmp_path):
    for cls in ("zebra", "apple", "mango"):
        d = tmp_path / "val" / cls
        d.mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "a.png")
    files, labels, classes = D.list_folder_tree(tmp_path, "val")
    assert classes == ["apple", "mango", "zebra"]
    assert [f.parent.name for f in files] == classes and labels == [0, 1, 2]


def test_imagenette_indices_follow_sorted_wnids():
    wnids = [w for w, _, _ in D.IMAGENETTE_CLASSES]
    assert wnids == sorted(wnids)
    assert D.IMAGENETTE_TO_IMAGENET == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]


def test_balanced_seeded_subsets():
    labels = np.repeat(np.arange(10), 30)
    ds = D.ImageSet(np.zeros((300, 3, 2, 2), np.uint8), labels, list("abcdefghij"), "x", "test")
    idx = ds.subset(7, seed=1)
    assert np.bincount(labels[idx]).tolist() == [7] * 10
    assert np.array_equal(idx, ds.subset(7, seed=1)) and not np.array_equal(idx, ds.subset(7, seed=2))
    with pytest.raises(ValueError, match="has 30 images"):
        ds.subset(31)


def test_corrupt_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="bad.jpg"):
        D.read_image(bad)
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        D.read_image(tmp_path / "gone.jpg")


def _tiny_archive(tmp_path, folder="cifar10-jpeg"):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    src = tmp_path / "src" / folder / "test" / "airplane"
    src.mkdir(parents=True)
    (src / "0000.png").write_bytes(buf.getvalue())
    arch = tmp_path / "shared" / "cifar10-jpeg.tar.gz"
    arch.parent.mkdir()
    with tarfile.open(arch, "w:gz") as t:
        t.add(tmp_path / "src" / folder, arcname=folder)
    return arch


def _use_archive(monkeypatch, arch_path):
    monkeypatch.setattr(D, "shared_dirs", lambda: [arch_path.parent])
    monkeypatch.setitem(
        D.ARCHIVES,
        "cifar10",
        D.ARCHIVES["cifar10"].__class__("cifar10-jpeg.tar.gz", "cifar10-jpeg", D.sha256_file(arch_path), "x", 32),
    )
    monkeypatch.setattr(D, "_network_available", lambda host: False)


def test_extraction_is_atomic_and_idempotent(tmp_path, monkeypatch):
    arch = _tiny_archive(tmp_path)
    _use_archive(monkeypatch, arch)
    dest = tmp_path / "data"
    real = tarfile.TarFile.extractall

    def broken(self, path, *a, **k):
        real(self, path, *a, **k)
        raise KeyboardInterrupt  # interrupted after writing files into the temporary folder

    monkeypatch.setattr(tarfile.TarFile, "extractall", broken)
    with pytest.raises(KeyboardInterrupt):
        D.prepare("cifar10", dest, verbose=False)
    assert list(dest.iterdir()) == []  # nothing half-made
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    out = D.prepare("cifar10", dest, verbose=False)
    assert (out / "test" / "airplane" / "0000.png").is_file()
    mtime = out.stat().st_mtime_ns
    assert D.prepare("cifar10", dest, verbose=False) == out and out.stat().st_mtime_ns == mtime


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    arch = _tiny_archive(tmp_path)
    _use_archive(monkeypatch, arch)
    monkeypatch.setitem(
        D.ARCHIVES, "cifar10", D.ARCHIVES["cifar10"].__class__("cifar10-jpeg.tar.gz", "cifar10-jpeg", "0" * 64, "x", 32)
    )
    with pytest.raises(D.DataMissing, match="sha256"):
        D.prepare("cifar10", tmp_path / "data", verbose=False)


def test_no_archive_no_network_gives_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "shared_dirs", lambda: [tmp_path / "nowhere"])
    monkeypatch.setattr(D, "_network_available", lambda host: False)
    monkeypatch.setattr(D, "DATA_DIR", tmp_path / "data")
    assert D.main(["cifar10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar10-jpeg.tar.gz" in err[0] and "nowhere" in err[0]
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        D.check_dataset("mnist")
    with pytest.raises(ValueError, match="unknown split"):
        D.load_dataset("cifar10", "dev")
