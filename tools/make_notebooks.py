"""Write the notebooks' source cells (run once by a developer; notebooks/*.ipynb are the committed source)."""
import sys
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent.parent / "notebooks"


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out = []
    for kind, src in cells:
        if kind == "md":
            out.append(nbf.v4.new_markdown_cell(src.strip()))
        else:
            c = nbf.v4.new_code_cell(src.strip())
            if kind == "params":
                c.metadata["tags"] = ["parameters"]
            out.append(c)
    nb.cells = out
    return nb


NB = {}

NB["00_data"] = [
    ("md", """
# 00 · The data sets

CIFAR-10 (JPEG) and Imagenette-224 as the study reads them: sample images per class, class counts,
and the patch sizes of the paper drawn to scale on a real image. All logic is in `scalecert.data`
and `scalecert.plots`; this notebook only orchestrates."""),
    ("params", """
profile = "quick"     # tiny | quick | paper
force = 0             # unused here (no cached computation)
datasets = ["cifar10", "imagenette"]
split = "eval"        # train | eval (test for CIFAR-10, val for Imagenette)
n_per_class = 6       # sample images shown per class
seed = 0"""),
    ("code", """
import pandas as pd
from scalecert import data as D, notebook as N, plots as P
from scalecert.windows import patch_pixels

N.check_profile(profile)
datasets = N.check_datasets(datasets)
n_per_class = N.per_class(profile, n_per_class if profile != "tiny" else 2)"""),
    ("md", "## Class counts"),
    ("code", """
# NBVAL_CHECK_OUTPUT
rows = []
for name in datasets:
    for sp in ("train", "eval"):
        ds = D.load_dataset(name, sp)
        counts = pd.Series(ds.labels).value_counts().sort_index()
        rows += [{"dataset": D.DATASET_LABELS[name], "split": ds.split, "class_index": c,
                  "class": ds.classes[c], "images": int(counts.get(c, 0))} for c in range(len(ds.classes))]
counts = pd.DataFrame(rows)
table = counts.pivot_table(index=["dataset", "class_index", "class"], columns="split", values="images").reset_index()
P.save_table(table, "00_data_class_counts")
print(table.to_string(index=False))"""),
    ("md", "## Sample images per class"),
    ("code", """
for name in datasets:
    ds = D.load_dataset(name, split)
    idx = ds.subset(n_per_class, seed)
    x, y = ds.tensors(idx)
    fig = P.class_grid(x, y, ds.classes, n_per_class, f"{D.DATASET_LABELS[name]} — {ds.split}, seed {seed}")
    P.save(fig, f"00_data_samples_{name}")"""),
    ("md", "## Patch sizes of the paper, to scale"),
    ("code", """
# NBVAL_CHECK_OUTPUT
PCTS = {"cifar10": [0.4, 2.4, 5.0, 8.0], "imagenette": [1.0, 2.0, 3.0, 5.0, 8.0]}
rows = []
for name in datasets:
    n = D.image_size(name)
    ds = D.load_dataset(name, split)
    image, _ = ds[int(ds.subset(1, seed)[0])]
    sizes = {f"{p}%": patch_pixels(p, n) for p in PCTS[name]}
    fig = P.patch_sizes_figure(image, sizes, f"{D.DATASET_LABELS[name]}: patch sizes on a {n}×{n} image")
    P.save(fig, f"00_data_patch_sizes_{name}")
    rows += [{"dataset": D.DATASET_LABELS[name], "patch_pct": p, "side_px": s,
              "true_pct": round(100 * s * s / n / n, 2)} for p, s in zip(PCTS[name], sizes.values())]
patch_table = pd.DataFrame(rows)
P.save_table(patch_table, "00_data_patch_sizes")
print(patch_table.to_string(index=False))"""),
]

if __name__ == "__main__":
    names = sys.argv[1:] or sorted(NB)
    for name in names:
        nbf.write(notebook(NB[name]), HERE / f"{name}.ipynb")
        print("wrote", name)
