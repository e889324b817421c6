"""Data sets: locate, verify and extract the archives; load images as [0, 1] float tensors.

Two on-disk layouts are read:

* a class-folder tree ``ROOT/{train,test|val}/<class>/<image>`` (the CIFAR-10 JPEG copy,
  Imagenette-224, ImageNet); class index = position of the folder name in sorted order;
* torchvision's ``cifar-10-batches-py`` pickles (the original lossless CIFAR-10).

Decoded images are cached once as a uint8 ``.npy`` file next to the extracted tree so that
training and evaluation do not decode JPEGs again.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .paths import DATA_DIR, ROOT

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: Imagenette classes in index order (sorted wnid) with their ImageNet-1k indices.
IMAGENETTE_CLASSES = [
    ("n01440764", "tench", 0),
    ("n02102040", "English springer", 217),
    ("n02979186", "cassette player", 482),
    ("n03000684", "chain saw", 491),
    ("n03028079", "church", 497),
    ("n03394916", "French horn", 566),
    ("n03417042", "garbage truck", 569),
    ("n03425413", "gas pump", 571),
    ("n03445777", "golf ball", 574),
    ("n03888257", "parachute", 701),
]
IMAGENETTE_TO_IMAGENET = [c[2] for c in IMAGENETTE_CLASSES]


@dataclass(frozen=True)
class Archive:
    """One data set archive: file name, folder it unpacks to, sha256 and a fallback URL."""

    filename: str
    folder: str
    sha256: str
    url: str
    size: int  # image side in pixels


ARCHIVES = {
    "cifar10": Archive(
        "cifar10-jpeg.tar.gz",
        "cifar10-jpeg",
        "ff26949c34c4e67da3fa472a1f142e33365dea058f94f1fa369b14ef3d986968",
        "torchvision:CIFAR10",
        32,
    ),
    "imagenette": Archive(
        "imagenette-224.tar.gz",
        "imagenette-224",
        "58ad9eba1e8f36b16263b1030651a9030ec3f544278c7a21564f6889b52450b0",
        "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
        224,
    ),
}
DATASET_LABELS = {"cifar10": "CIFAR-10 (JPEG)", "imagenette": "Imagenette-224", "imagenet": "ImageNet"}
EVAL_SPLIT = {"cifar10": "test", "imagenette": "val", "imagenet": "val"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


class DataMissing(RuntimeError):
    """Raised when an archive is neither on disk nor downloadable."""


def check_dataset(name: str) -> str:
    """Return the canonical data set name or raise ValueError listing the known ones."""
    key = str(name).lower().replace("-", "").replace("_", "")
    aliases = {
        "cifar10": "cifar10",
        "cifar10jpeg": "cifar10",
        "imagenette": "imagenette",
        "imagenette224": "imagenette",
        "imagenet": "imagenet",
    }
    if key not in aliases:
        raise ValueError(f"unknown dataset {name!r}: expected one of cifar10, imagenette, imagenet")
    return aliases[key]


def shared_dirs() -> list[Path]:
    """Return the folders searched for archives (SCALECERT_SHARED_DATA first, then ../shared/data)."""
    dirs = []
    if os.environ.get("SCALECERT_SHARED_DATA"):
        dirs.append(Path(os.environ["SCALECERT_SHARED_DATA"]))
    dirs.append(ROOT.parent / "shared" / "data")
    return dirs


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_extract(archive_path: Path, dest: Path, folder: str) -> None:
    """Extract ``folder`` from a tar archive into ``dest/folder`` via a temporary sibling."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=dest))
    try:
        with tarfile.open(archive_path) as tar:
            tar.extractall(tmp, filter="data")
        if not (tmp / folder).is_dir():
            raise DataMissing(f"{archive_path} does not contain the folder {folder}/")
        os.replace(tmp / folder, dest / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_cifar(dest: Path) -> Path:
    """Fetch torchvision's CIFAR-10 (lossless, pickled) into dest; return its folder."""
    from torchvision.datasets import CIFAR10

    tmp = Path(tempfile.mkdtemp(prefix=".cifar-dl-", dir=dest))
    try:
        CIFAR10(str(tmp), train=True, download=True)
        os.replace(tmp / "cifar-10-batches-py", dest / "cifar-10-batches-py")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "cifar-10-batches-py"


def _download_imagenette(dest: Path, arch: Archive) -> Path:
    """Fetch the public Imagenette archive, resize to 224x224 class folders; return the tree."""
    import urllib.request

    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix=".imagenette-dl-", dir=dest))
    try:
        tgz = tmp / "imagenette.tgz"
        urllib.request.urlretrieve(arch.url, tgz)
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp / "raw", filter="data")
        src = next((tmp / "raw").iterdir())
        out = tmp / arch.folder
        for split in ("train", "val"):
            for f in sorted((src / split).glob("*/*.JPEG")):
                target = out / split / f.parent.name / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR).save(target, quality=95)
        os.replace(out, dest / arch.folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / arch.folder


def _network_available(host: str, timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def prepare(name: str, dest: Path | None = None, verbose: bool = True) -> Path:
    """Return the extracted folder of a data set, extracting or fetching it first if needed."""
    name = check_dataset(name)
    if name == "imagenet":
        root = Path(os.environ.get("SCALECERT_IMAGENET", (dest or DATA_DIR) / "imagenet"))
        if not (root / "val").is_dir():
            raise DataMissing(
                f"ImageNet not found: put the train/ and val/ class folders in {root} or set SCALECERT_IMAGENET"
            )
        return root
    arch = ARCHIVES[name]
    dest = Path(dest or DATA_DIR)
    target = dest / arch.folder
    if target.is_dir():
        return target
    if name == "cifar10" and (dest / "cifar-10-batches-py").is_dir():
        return dest / "cifar-10-batches-py"
    for d in shared_dirs():
        path = d / arch.filename
        if path.is_file():
            digest = sha256_file(path)
            if digest != arch.sha256:
                raise DataMissing(f"{path}: sha256 {digest} does not match the expected {arch.sha256}")
            if verbose:
                print(f"extracting {path} -> {target}", file=sys.stderr)
            _atomic_extract(path, dest, arch.folder)
            return target
    host = "www.cs.toronto.edu" if name == "cifar10" else "s3.amazonaws.com"
    missing = (
        f"{arch.filename} not found in {' or '.join(map(str, shared_dirs()))} and the original "
        f"could not be fetched: put {arch.filename} in {shared_dirs()[-1]} "
        f"(or set SCALECERT_SHARED_DATA to its folder)"
    )
    if not _network_available(host):
        raise DataMissing(missing)
    dest.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"{arch.filename} not found locally; fetching the original data set", file=sys.stderr)
    try:
        return _download_cifar(dest) if name == "cifar10" else _download_imagenette(dest, arch)
    except Exception as e:  # any network or archive failure ends in the same one-line message
        raise DataMissing(f"{missing} ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- loading
def list_classes(root: Path, split: str) -> list[str]:
    """Return the class names of a class-folder split: its sorted folder names."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder missing: {split_dir}")
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def list_folder_tree(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """Return (files, labels, class names) of a class-folder split; labels follow sorted folder names."""
    split_dir = Path(root) / split
    classes = list_classes(root, split)
    files, labels = [], []
    for idx, cls in enumerate(classes):
        for f in sorted((split_dir / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(idx)
    return files, labels, classes


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """Return an image file as an HxWx3 uint8 array (greyscale converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"image file missing: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"corrupt image file {path}: {e}") from e


def read_cifar_batches(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (N x 32 x 32 x 3 uint8 images, labels) from torchvision's cifar-10-batches-py."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        path = Path(root) / n
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch file missing: {path}")
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d["labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


class ImageSet(torch.utils.data.Dataset):
    """A split held as one uint8 array (N, 3, H, W); items are ([0,1] float image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, split: str):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.classes, self.name, self.split = classes, name, split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i])).float().div_(255), int(self.labels[i])

    def tensors(self, idx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (images in [0,1] as float32 NCHW, labels) for the given indices (all by default)."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx])).float().div_(255)
        return x, torch.from_numpy(self.labels[idx])

    def subset(self, n_per_class: int, seed: int = 0) -> np.ndarray:
        """Return sorted indices of a seeded class-balanced subset with n_per_class images per class."""
        rng = np.random.default_rng(seed)
        out = []
        for c in range(len(self.classes)):
            pool = np.flatnonzero(self.labels == c)
            if n_per_class > len(pool):
                raise ValueError(f"class {self.classes[c]} has {len(pool)} images, asked for {n_per_class}")
            out.append(rng.choice(pool, size=n_per_class, replace=False))
        return np.sort(np.concatenate(out))


def _decode_tree(root: Path, split: str, size: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from tqdm.auto import tqdm

    files, labels, classes = list_folder_tree(root, split)
    first = read_image(files[0], size)
    arr = np.empty((len(files),) + first.shape, dtype=np.uint8)
    for i, f in enumerate(tqdm(files, desc=f"decode {root.name}/{split}", leave=False, disable=len(files) < 2000)):
        arr[i] = read_image(f, size)
    return arr.transpose(0, 3, 1, 2), np.asarray(labels), classes


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # through a file object: np.save would append ".npy" to a temp name
        np.save(f, arr)


def load_split(root: Path, split: str, size: int | None = None, cache: bool = True):
    """Return (uint8 NCHW images, labels, classes) of a split from a folder tree or CIFAR pickles."""
    root = Path(root)
    if (root / "test_batch").is_file() or (root / "data_batch_1").is_file():
        x, y = read_cifar_batches(root, "train" if split == "train" else "test")
        return x.transpose(0, 3, 1, 2), y, list(CIFAR10_CLASSES)
    cache_x = root / f".{split}-uint8.npy"
    cache_y = root / f".{split}-labels.npy"
    classes = list_classes(root, split)  # not the file list: sorting 50,000 paths cost 0.4 s per load
    if cache and cache_x.is_file() and cache_y.is_file():
        x = np.load(cache_x, mmap_mode="r")
        if size is None or x.shape[2:] == (size, size):  # a cache decoded at another size is decoded again
            return x, np.load(cache_y), classes
    x, y, classes = _decode_tree(root, split, size)
    if cache:
        from .results import atomic_write, remove_stale_temps

        for path, arr in ((cache_x, x), (cache_y, y)):
            # a temp name per writer: two processes decoding the same split at once (the background jobs,
            # `make data` beside a CLI call) each finish with a whole file instead of losing each other's temp file
            remove_stale_temps(path)  # a killed writer's (1.4 GB for Imagenette train)
            atomic_write(path, lambda tmp, arr=arr: _save_npy(tmp, arr))
    return x, y, classes


def load_dataset(name: str, split: str | None = None, root: Path | None = None) -> ImageSet:
    """Return a split ('train', or 'test'/'val' = the evaluation split) of a data set as an ImageSet."""
    name = check_dataset(name)
    split = split or EVAL_SPLIT[name]
    if split in ("test", "val", "eval"):
        split = EVAL_SPLIT[name]
    if split not in ("train", "test", "val"):
        raise ValueError(f"unknown split {split!r}: expected train, test or val")
    root = Path(root) if root is not None else prepare(name)
    if name == "cifar10" and (root / "test_batch").is_file():
        split_dir = split
    else:
        split_dir = "test" if (name == "cifar10" and split == "test") else split
    size = 224 if name in ("imagenette", "imagenet") else None
    x, y, classes = load_split(root, split_dir, size=size)
    canonical = {"cifar10": CIFAR10_CLASSES, "imagenette": [w for w, _, _ in IMAGENETTE_CLASSES]}.get(name)
    if canonical and set(classes) <= set(canonical) and classes != canonical:
        # a tree missing some classes keeps the data set's own indices
        y = np.asarray([canonical.index(c) for c in classes])[np.asarray(y)]
        classes = list(canonical)
    if name == "imagenette":
        names = dict((w, n) for w, n, _ in IMAGENETTE_CLASSES)
        classes = [names.get(c, c) for c in classes]
    return ImageSet(x, y, classes, name, split)


def image_size(name: str) -> int:
    """Return the image side in pixels of a data set."""
    return 32 if check_dataset(name) == "cifar10" else 224


def eval_ids(ds: ImageSet, per_class: int | None, seed: int = 0) -> list[int]:
    """Return the image indices of a seeded class-balanced subset (every index if per_class is None)."""
    return list(range(len(ds))) if per_class is None else ds.subset(per_class, seed).tolist()


def augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Return a batch after random crop (reflect padding) and horizontal flip, per image."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad,) * 4, mode="reflect")
    rows = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen) + torch.arange(h)
    cols = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen) + torch.arange(w)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return xp[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def main(argv=None) -> int:
    """Command line of the data step: extract (or fetch) and decode every data set."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m scalecert.data", description=main.__doc__)
    p.add_argument("datasets", nargs="*", default=["cifar10", "imagenette"])
    p.add_argument("--decode", action="store_true", help="also decode to the uint8 cache")
    a = p.parse_args(argv)
    try:
        for name in a.datasets:
            root = prepare(name)
            if a.decode:
                for split in ("train", EVAL_SPLIT[check_dataset(name)]):
                    load_dataset(name, split, root=root)
            print(f"{name}: {root}")
    except DataMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
