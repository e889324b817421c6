"""The explorer of notebook 13: what ScaleCert does with one patch on one image, as data and as a figure.

:func:`panel` is a pure function of (model, image, label, patch content, patch position, window settings):
it runs the engine of :mod:`scalecert.defense` twice, ``detect`` on the patched image and ``certify`` on the
clean one, and records each occluded prediction the engine evaluates on the way, so that the panel shows
exactly the engine's work (and its verdicts are the engine's records, not a re-implementation). It also
returns the top-n SIN map of the patched image with its MeanShift clusters (the conventions of
:mod:`scalecert.analysis`). :class:`Explorer` adds what the notebook needs around it: data sets, shipped models,
patch contents (the cached universal patch, a per-image PGD patch, zeros, noise) and caches, so that moving the
patch re-runs ``detect`` only. :func:`figure` and :func:`verdict_text` draw a panel; the widgets are in
:mod:`scalecert.explorer_ui`.
"""

from __future__ import annotations

import json
import numbers
import textwrap
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import data as D
from .analysis import cluster_points, top_n, top_sin_points
from .defense import Engine, check_images, check_labels
from .windows import patch_pixels

#: the patch contents the explorer offers
CONTENTS = ("universal", "pgd", "zeros", "noise")
#: engine modes; the paper's mode uses the paper's alert rule (r x r block or lost majority), as in notebook 05
MODES = {"sound": "strict", "paper": "paper"}
#: PGD steps of a per-image patch per profile (computed on demand; Imagenette steps cost about 0.1 s each here)
PGD_STEPS = {"tiny": 10, "quick": 40, "paper": 100}


# --------------------------------------------------------------------------------------------- checks
def check_position(position, n: int, p: int) -> tuple[int, int]:
    """Return the patch's top-left corner (row, col) after checking that a p x p patch there lies in the n x n image."""
    try:
        row, col = position
    except (TypeError, ValueError):
        raise ValueError(f"position must be (row, col) of the patch's top-left pixel, got {position!r}") from None
    for v in (row, col):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"position must be two whole numbers, got {position!r}")
    if not (0 <= row <= n - p and 0 <= col <= n - p):
        raise ValueError(
            f"position {tuple(position)} puts the {p}x{p} patch outside the {n}x{n} image: "
            f"row and col must lie in [0, {n - p}]"
        )
    return int(row), int(col)


def check_window_settings(mode: str, tau, r) -> tuple[str, float | None, int]:
    """Return (mode, tau, r) after checking them: tau None or in (0, 1] (1 = no merging, returned as None)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {sorted(MODES)}")
    if tau is not None:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau <= 1:
            raise ValueError(f"tau must be None or lie in (0, 1], got {tau!r}")
        tau = None if tau >= 1 else float(tau)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r must be a whole number >= 1, got {r!r}")
    return mode, tau, int(r)


def check_patch_content(patch: torch.Tensor, p: int) -> torch.Tensor:
    """Return a patch content (3, p, p) in [0, 1] as float after checking it."""
    if not isinstance(patch, torch.Tensor) or patch.shape != (3, p, p) or not patch.is_floating_point():
        raise ValueError(
            f"patch content must be a float tensor of shape (3, {p}, {p}), got "
            f"{tuple(patch.shape) if isinstance(patch, torch.Tensor) else type(patch).__name__}"
        )
    if torch.isnan(patch).any() or patch.min() < 0 or patch.max() > 1:
        raise ValueError("patch content must lie in [0, 1] without NaN")
    return patch.float()


# --------------------------------------------------------------------------------------------- the engine, traced
@dataclass
class Trace:
    """One image through ``Engine.run``: its record and every occluded prediction evaluated, in the engine's order."""

    record: dict
    sin: torch.Tensor | None  # (h, w) the engine's SIN mask (top-k superficial features); None without a SIN layer
    candidates: torch.Tensor  # (K, 4) boxes of the family's candidate windows (footprint meets SIN(x))
    boxes: torch.Tensor  # (M, 4) windows evaluated (per-image merged ones in paper mode with tau)
    labels: torch.Tensor  # (M,) their occluded predictions
    seconds: float

    @property
    def disagree(self) -> torch.Tensor:
        """Return a boolean (M,) per evaluated window: its occluded prediction differs from the prediction."""
        return self.labels != self.record["pred"]

    @property
    def forwards(self) -> int:
        """Return the forward passes spent: one on the image, one per evaluated window (``experiments.summarise``)."""
        return 1 + int(self.record["n_evaluated"])


@torch.no_grad()
def trace(engine: Engine, image: torch.Tensor, label: int | None = None, early_stop: bool = True) -> Trace:
    """Return ``engine.run`` on one image (``detect`` without a label, ``certify`` with one) with its windows, recorded
    by the engine's ``observer`` hook (the SIN mask, each chunk's windows and occluded predictions)."""
    x = check_images(image)
    if x.shape[0] != 1:
        raise ValueError(f"trace takes one image, got {x.shape[0]}")
    y = None if label is None else check_labels(label, 1, engine.model.num_classes)
    seen: dict = {"boxes": [], "labels": []}

    def observe(event, *data):
        if event == "sin":
            seen["sin"] = data[0]
        else:
            seen["boxes"].append(data[0].cpu())
            seen["labels"].append(data[1].cpu())

    t0 = time.perf_counter()
    rec = engine.run(x, y, early_stop=early_stop, observer=observe)[0]
    seconds = time.perf_counter() - t0
    sin = seen["sin"]
    cand = engine.candidates(sin)[0].cpu() if engine.use_sin else torch.ones(len(engine.family), dtype=torch.bool)
    boxes = torch.cat(seen["boxes"]) if seen["boxes"] else torch.zeros(0, 4, dtype=torch.long)
    labels = torch.cat(seen["labels"]) if seen["labels"] else torch.zeros(0, dtype=torch.long)
    return Trace(rec, sin[0].cpu() if engine.use_sin else None, engine.family.boxes[cand], boxes, labels, seconds)


def first_break(t: Trace) -> dict | None:
    """Return the first evaluated window (engine order) whose occluded prediction differs, or None."""
    bad = t.disagree.nonzero().flatten()
    if len(bad) == 0:
        return None
    i = int(bad[0])
    return {"box": tuple(int(v) for v in t.boxes[i].tolist()), "label": int(t.labels[i]), "index": i}


# --------------------------------------------------------------------------------------------- the panel
def sin_clusters(model, image: torch.Tensor, n_points: int | None = None) -> dict:
    """Return the top-n SINs (row, col feature positions) of one image, their MeanShift clusters and the map size."""
    n_img = image.shape[-1]
    n_points = n_points or top_n(n_img)
    pts, (h, w) = top_sin_points(model, image[None], n_points)
    labels, centres = cluster_points(pts[0], 0.1 * h)
    sizes = np.bincount(labels)
    return {
        "points": pts[0],
        "clusters": labels,
        "centres": centres,
        "sizes": sizes.tolist(),
        "hw": (h, w),
        "n": n_points,
    }


def engine_for(model, n: int, patch, mode: str = "sound", tau=None, r: int = 3) -> Engine:
    """Return the engine of these window settings (the paper's mode with the paper's rule)."""
    mode, tau, r = check_window_settings(mode, tau, r)
    return Engine(model, n, patch, r=r, tau=tau, mode=mode, rule=MODES[mode])


def certify_clean(engine: Engine, image: torch.Tensor, label: int) -> dict:
    """Return ``certify``'s record of the clean image, the first window that breaks it (None if none did), forwards
    and seconds; the reason in words."""
    t = trace(engine, image, label, early_stop=True)
    rec, brk = t.record, first_break(t)
    if rec["certified"]:
        why = "certified: every candidate window keeps the label"
    elif rec["pred"] != rec["label"]:
        why = "not certified: the clean prediction is wrong"
    elif brk is not None:
        why = f"not certified: window {brk['box']} predicts {brk['label']}"
    else:
        why = "not certified"
    return {"record": rec, "first_break": brk, "forwards": t.forwards, "seconds": t.seconds, "reason": why, "trace": t}


def panel(
    model,
    image: torch.Tensor,
    label: int,
    patch_content: torch.Tensor,
    position,
    patch,
    *,
    mode: str = "sound",
    tau=None,
    r: int = 3,
    clean: dict | None = None,
    engine: Engine | None = None,
) -> dict:
    """Return the explorer's data for one setting.

    ``image`` (3, n, n) in [0, 1] with its true ``label``; ``patch_content`` (3, p, p) pasted with its top-left
    pixel at ``position`` (row, col); ``patch`` the patch size as ``certify`` takes it (px as int, % as float).
    Keys: ``patched`` image, ``patch_box``; ``sin`` (top-n SIN points, MeanShift clusters); ``detect``: the engine's
    record of the patched image with its ``candidates`` (boxes), evaluated ``windows`` and their ``labels``,
    ``disagree`` (booleans), ``forwards`` and ``seconds``; ``certify``: :func:`certify_clean` of the clean image
    (pass ``clean`` to reuse one: it does not depend on the patch); ``seconds`` in all.
    """
    from .attacks import apply_patch

    t0 = time.perf_counter()
    x = check_images(image)
    if x.shape[0] != 1:
        raise ValueError(f"panel takes one image (3, n, n), got {tuple(image.shape)}")
    n = x.shape[-1]
    y = int(check_labels(label, 1, model.num_classes)[0])
    p = patch_pixels(patch, n)
    if p >= n:
        raise ValueError(f"a patch of {p} px does not leave any of the {n}x{n} image uncovered")
    content = check_patch_content(patch_content, p)
    row, col = check_position(position, n, p)
    eng = engine or engine_for(model, n, patch, mode, tau, r)
    xp = apply_patch(x, content, torch.tensor([[row, col]]))
    det = trace(eng, xp, None, early_stop=False)
    if clean is None:
        clean = certify_clean(eng, x, y)
    t1 = time.perf_counter()
    sins = sin_clusters(eng.model, xp[0])
    return {
        "n": n,
        "p": p,
        "position": (row, col),
        "patch_box": (row, col, row + p - 1, col + p - 1),
        "label": y,
        "image": x[0],
        "patched": xp[0],
        "settings": {
            "mode": eng.mode,
            "rule": eng.rule,
            "tau": eng.tau,
            "r": eng.r,
            "patch": patch,
            "windows": len(eng.family),
            "window_side": eng.family.side,
            "sin_rate": eng.model.sin_rate,
            "sin_layer": eng.model.sin_layer,
        },
        "sin": dict(sins, engine_mask=det.sin, seconds=time.perf_counter() - t1),
        "detect": {
            "record": det.record,
            "candidates": det.candidates,
            "windows": det.boxes,
            "labels": det.labels,
            "disagree": det.disagree,
            "forwards": det.forwards,
            "seconds": det.seconds,
        },
        "certify": clean,
        "seconds": time.perf_counter() - t0,
    }


def summary(pan: dict, classes=None) -> dict:
    """Return one flat row of a panel (for tables): verdicts, counts, forwards."""
    name = (lambda k: classes[k]) if classes is not None else str
    det, cert = pan["detect"]["record"], pan["certify"]["record"]
    return {
        "label": name(pan["label"]),
        "patch_px": pan["p"],
        "position": pan["position"],
        "pred_patched": name(det["pred"]),
        "detect": "alert" if det["alert"] else name(det["output"]),
        "suspected_box": det["suspected_box"],
        "candidates": det["n_candidates"],
        "disagreeing": det["n_disagree"],
        "disagree_labels": [name(k) for k in det["disagree_labels"]],
        "detect_forwards": pan["detect"]["forwards"],
        "clean_pred": name(cert["pred"]),
        "certified": cert["certified"],
        "first_break": None if pan["certify"]["first_break"] is None else pan["certify"]["first_break"]["box"],
        "certify_forwards": pan["certify"]["forwards"],
        "sin_clusters": len(pan["sin"]["sizes"]),
    }


def verdict_text(pan: dict, classes=None, timings: bool = True) -> str:
    """Return the panel's verdicts in two lines (detect on the patched image, certify on the clean one), each with its
    forwards and (``timings``) seconds."""
    name = (lambda k: f"{classes[k]} ({k})") if classes is not None else str
    det, cert = pan["detect"]["record"], pan["certify"]
    if det["alert"]:
        d = (
            f"detect: ALERT, {det['n_disagree']} of {det['n_evaluated']} windows disagree "
            f"(labels {', '.join(name(k) for k in det['disagree_labels'])}), suspected box {det['suspected_box']}"
        )
    else:
        d = f"detect: {name(det['output'])}, all {det['n_evaluated']} candidate windows agree"
    d += f"; {pan['detect']['forwards']} forwards" + (f", {pan['detect']['seconds']:.2f} s" if timings else "")
    c = cert["record"]
    if c["certified"]:
        v = f"certify (clean image): CERTIFIED {name(c['label'])}"
    elif c["pred"] != c["label"]:
        v = (
            f"certify (clean image): NOT CERTIFIED, clean prediction {name(c['pred'])} is not the label "
            f"{name(c['label'])}"
        )
    elif cert["first_break"] is not None:
        b = cert["first_break"]
        v = f"certify (clean image): NOT CERTIFIED, window {b['box']} predicts {name(b['label'])}"
    else:
        v = "certify (clean image): NOT CERTIFIED"
    v += f"; {cert['forwards']} forwards" + (f", {cert['seconds']:.2f} s" if timings else "")
    return d + "\n" + v


# --------------------------------------------------------------------------------------------- the figure
def figure(pan: dict, classes=None, title: str | None = None, fig=None, timings: bool = False):
    """Return a figure of a panel: patched image with the patch (and suspected) box; top-n SIN map with its MeanShift
    clusters; candidate windows (grey: how many cover a pixel) and the disagreeing ones coloured by label; verdicts,
    with the seconds they took only with ``timings`` (the live explorer), so that a saved figure is reproducible."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from .plots import to_hwc

    if fig is None:  # not through pyplot: a notebook shows the figure only where it is displayed
        fig = Figure(figsize=(12.5, 3.4))
    fig.clear()
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.25]})
    n, img = pan["n"], to_hwc(pan["patched"])
    name = (lambda k: classes[k]) if classes is not None else str
    det = pan["detect"]

    def rect(box, **kw):
        r0, c0, r1, c1 = box
        return Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, **kw)

    ax = axes[0]
    ax.imshow(img, interpolation="nearest")
    ax.add_patch(rect(pan["patch_box"], edgecolor="yellow", linewidth=1.5))
    if det["record"]["suspected_box"] is not None:
        ax.add_patch(rect(det["record"]["suspected_box"], edgecolor="red", linewidth=1.2, linestyle="--"))
    ax.set_title(
        f"patched: predicted {name(det['record']['pred'])}\n(label {name(pan['label'])}; red: suspected box)",
        fontsize=8,
    )

    ax = axes[1]
    s = pan["sin"]
    ax.imshow(img, interpolation="nearest", alpha=0.45)
    h, w = s["hw"]
    if s.get("engine_mask") is not None:  # the engine's top-k SINs, drawn per feature at its stride
        m = s["engine_mask"].float().numpy()
        ax.imshow(
            np.ma.masked_where(m == 0, m),
            cmap="Greys",
            alpha=0.25,
            vmin=0,
            vmax=1,
            extent=(-0.5, n - 0.5, n - 0.5, -0.5),
            interpolation="nearest",
        )
    sy, sx = n / h, n / w
    pts = s["points"]
    ax.scatter(
        (pts[:, 1] + 0.5) * sx - 0.5,
        (pts[:, 0] + 0.5) * sy - 0.5,
        c=s["clusters"] % 10,
        cmap="tab10",
        vmin=0,
        vmax=9,
        s=10,
        edgecolors="black",
        linewidths=0.3,
    )
    ax.set_title(
        f"top-{s['n']} SINs: {len(s['sizes'])} MeanShift cluster{'s' * (len(s['sizes']) != 1)}"
        + ("\n(shade: the engine's top-k SINs)" if s.get("engine_mask") is not None else ""),
        fontsize=8,
    )

    ax = axes[2]
    ax.imshow(img, interpolation="nearest", alpha=0.5)
    cover = torch.zeros(n, n)
    for r0, c0, r1, c1 in det["candidates"].tolist():
        cover[r0 : r1 + 1, c0 : c1 + 1] += 1
    if len(det["candidates"]):
        ax.imshow(
            np.ma.masked_where(cover.numpy() == 0, cover.numpy()), cmap="Greys", alpha=0.35, interpolation="nearest"
        )
    bad = det["disagree"]
    if bad.any():
        boxes, labs = det["windows"][bad], det["labels"][bad]
        ax.add_collection(
            PatchCollection(
                [rect(b) for b in boxes.tolist()],
                match_original=False,
                facecolor="none",
                edgecolor=[plt.cm.tab10(int(k) % 10) for k in labs.tolist()],
                linewidth=0.6,
                alpha=0.8,
            )
        )
        for k in sorted(set(labs.tolist())):
            ax.plot([], [], color=plt.cm.tab10(k % 10), label=name(k))
        ax.legend(fontsize=6, loc="lower left", frameon=True, framealpha=0.7)
    ax.set_title(
        f"{det['record']['n_candidates']} of {pan['settings']['windows']} windows candidates (shade),\n"
        f"{int(bad.sum())} disagree (by label)",
        fontsize=8,
    )
    for ax in axes[:3]:
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(n - 0.5, -0.5)
        ax.axis("off")

    ax = axes[3]
    ax.axis("off")
    st = pan["settings"]
    lines = verdict_text(pan, classes, timings).replace("; ", "\n").replace(", suspected", "\nsuspected").split("\n")
    lines += [
        "",
        f"mode {st['mode']} (rule {st['rule']}), r = {st['r']}, tau = {st['tau']}",
        f"{st['windows']} windows of {st['window_side']} px",
        f"SIN layer {st['sin_layer']}, rate {st['sin_rate']}"
        if st["sin_rate"]
        else "no SIN layer: Minority Reports (pixels filled)",
    ] + ([f"update: {pan['seconds']:.2f} s"] if timings else [])
    text = "\n".join(textwrap.fill(t, 52, subsequent_indent="   ") for t in lines)
    ax.text(0, 1, text, va="top", ha="left", fontsize=7, family="monospace", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    # a fixed layout: tight_layout measured every text (half a second of each update)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.02, top=0.84 if title else 0.9, wspace=0.04)
    return fig


# --------------------------------------------------------------------------------------------- settings around it
def shipped_models(dataset: str) -> list[str]:
    """Return the shipped checkpoints of a data set that the engine runs (ScaleCert's SIN models and the vanilla
    ones, and the ablation twins; the peers' architectures are not split networks), SIN models first, the vanilla
    model last."""
    from .models import ARCHS, CHECKPOINT_DIR

    dataset = D.check_dataset(dataset)
    keys = []
    for card in sorted(CHECKPOINT_DIR.glob("*.json")):
        c = json.loads(card.read_text())
        if c.get("dataset_key") == dataset and c.get("arch") in ARCHS and card.with_suffix(".pt").is_file():
            keys.append((not c.get("sin_rate"), card.stem.endswith("_vanilla"), card.stem))
    return [name for *_, name in sorted(keys)]


@dataclass(frozen=True)
class Setting:
    """One explorer setting (what the widgets choose)."""

    dataset: str = "cifar10"
    model: str | None = None  # None: the data set's default ScaleCert model (notebook 05's)
    image: int = 0  # index in the evaluation split
    patch_pct: float = 5.0  # patch size in % of the image
    position: tuple = (0, 0)  # top-left pixel (row, col)
    content: str = "universal"
    mode: str = "sound"
    tau: float | str | None = "default"  # "default": the data set's (notebook 05's: none at 32x32, 0.3 at 224x224)
    r: int = 3


class Explorer:
    """Settings to panels, with the data sets, models, engines, patch contents and clean certificates cached.

    ``profile`` sets the universal patch's Adam steps (as notebook 02's) and the PGD steps of a per-image patch;
    ``force`` trains the universal patch again instead of reading it from the cache.
    """

    def __init__(self, profile: str = "quick", device: str = "cpu", seed: int = 0, force: bool = False):
        from . import notebook as N

        self.profile = N.check_profile(profile)
        self.device, self.seed, self.force = device, seed, bool(force)
        self._data, self._models, self._engines, self._patches, self._clean = {}, {}, {}, {}, {}

    # lookups, cached
    def dataset(self, name: str):
        name = D.check_dataset(name)
        if name not in self._data:
            self._data[name] = D.load_dataset(name, "eval")
        return self._data[name]

    def model(self, dataset: str, name: str | None):
        from . import experiments as E
        from .models import load_model

        name = name or E.model_name(dataset, 1, E.DEFAULT_RATE[dataset])
        if name not in shipped_models(dataset):
            raise ValueError(f"unknown model {name!r} for {dataset}: expected one of {shipped_models(dataset)}")
        if name not in self._models:
            self._models[name] = load_model(name, device=self.device)
        return name, self._models[name]

    def check(self, s: Setting) -> Setting:
        """Return the setting with defaults filled in (model, tau) after checking every field."""
        from . import experiments as E
        from . import notebook as N

        dataset = D.check_dataset(s.dataset)
        model, _ = self.model(dataset, s.model)
        ds = self.dataset(dataset)
        if isinstance(s.image, bool) or not isinstance(s.image, numbers.Integral) or not 0 <= s.image < len(ds):
            raise ValueError(
                f"image must be an index in [0, {len(ds) - 1}] of the {dataset} evaluation split, got {s.image!r}"
            )
        pct = N.check_patch(s.patch_pct, dataset)
        n = D.image_size(dataset)
        p = patch_pixels(pct, n)
        position = check_position(s.position, n, p)
        if s.content not in CONTENTS:
            raise ValueError(f"unknown patch content {s.content!r}: expected one of {CONTENTS}")
        tau = E.DEFAULT_TAU[dataset] if s.tau == "default" else s.tau
        mode, tau, r = check_window_settings(s.mode, tau, s.r)
        return Setting(dataset, model, int(s.image), pct, position, s.content, mode, tau, r)

    def centre(self, dataset: str, patch_pct: float) -> tuple[int, int]:
        """Return the position that centres a patch of that size on the image."""
        n = D.image_size(dataset)
        c = (n - patch_pixels(float(patch_pct), n)) // 2
        return c, c

    def engine(self, s: Setting) -> Engine:
        key = (s.model, s.patch_pct, s.mode, s.tau, s.r)
        if key not in self._engines:
            _, m = self.model(s.dataset, s.model)
            self._engines[key] = engine_for(m, D.image_size(s.dataset), s.patch_pct, s.mode, s.tau, s.r)
        return self._engines[key]

    def content(self, s: Setting) -> torch.Tensor:
        """Return the patch content (3, p, p) of a checked setting (computed once per key, then cached)."""
        from . import attacks as T
        from . import experiments as E
        from . import notebook as N

        n = D.image_size(s.dataset)
        p = patch_pixels(s.patch_pct, n)
        if s.content == "zeros":
            return torch.zeros(3, p, p)
        if s.content == "noise":
            return torch.rand(3, p, p, generator=torch.Generator().manual_seed(self.seed + p))
        if s.content == "universal":  # notebook 02's: trained on the vanilla model, cached on disk
            key = ("universal", s.dataset, s.patch_pct)
            if key not in self._patches:
                self._patches[key] = E.cached_universal_patch(
                    s.dataset,
                    E.model_name(s.dataset),
                    s.patch_pct,
                    T.UNIVERSAL_TARGET[s.dataset],
                    steps=N.patch_steps(self.profile),
                    seed=self.seed,
                    force=self.force,
                    device=self.device,
                ).cpu()
            return self._patches[key]
        key = ("pgd", s.model, s.image, s.patch_pct, s.position)  # per image, model and position
        if key not in self._patches:
            _, m = self.model(s.dataset, s.model)
            x, y = self.dataset(s.dataset).tensors([s.image])
            xp, _ = T.pgd_patch(
                m,
                x.to(self.device),
                y,
                p,
                corners=torch.tensor([s.position]),
                steps=PGD_STEPS[self.profile],
                step_size=0.1,
                seed=self.seed,
            )
            r0, c0 = s.position
            self._patches[key] = xp[0, :, r0 : r0 + p, c0 : c0 + p].detach().cpu().clamp(0, 1)
        return self._patches[key]

    def update(self, setting: Setting) -> dict:
        """Return the panel of a setting (checked first); the clean image's certificate is computed once per image
        and window setting, so that moving the patch or changing its content re-runs ``detect`` only."""
        t0 = time.perf_counter()
        s = self.check(setting)
        _, m = self.model(s.dataset, s.model)
        x, y = self.dataset(s.dataset).tensors([s.image])
        eng = self.engine(s)
        content = self.content(s)
        ckey = (s.model, s.image, s.patch_pct, s.mode, s.tau, s.r)
        pan = panel(
            m,
            x[0],
            int(y[0]),
            content,
            s.position,
            s.patch_pct,
            mode=s.mode,
            tau=s.tau,
            r=s.r,
            clean=self._clean.get(ckey),
            engine=eng,
        )
        self._clean[ckey] = pan["certify"]
        pan["setting"] = s
        pan["seconds"] = time.perf_counter() - t0  # the whole update, patch content included
        return pan

    def classes(self, dataset: str) -> list[str]:
        return list(self.dataset(dataset).classes)


def demo_settings(dataset: str, image: int, patch_pct: float = 5.0) -> list[Setting]:
    """Return notebook 13's fixed sequence on one image: the universal patch in the top-left corner, then on the
    object (the centre), then zeros and noise there, then the paper's mode and r = 1 (the data set's default tau)."""
    from dataclasses import replace

    n = D.image_size(dataset)
    c = (n - patch_pixels(float(patch_pct), n)) // 2
    base = Setting(dataset, None, image, patch_pct, (0, 0), "universal", "sound", "default", 3)
    centre = replace(base, position=(c, c))
    return [
        base,
        centre,
        replace(centre, content="zeros"),
        replace(centre, content="noise"),
        replace(centre, mode="paper"),
        replace(centre, r=1),
    ]
