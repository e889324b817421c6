"""Widgets of notebook 13 around :class:`scalecert.explorer.Explorer`: every change re-renders the panel.

Nothing is computed here: each change builds a :class:`~scalecert.explorer.Setting` from the widgets, asks the
explorer for its panel and shows the panel's figure (as a PNG) and verdicts. The widgets carry CSS classes
(``scalecert-row``, ``scalecert-col``, ``scalecert-verdict``, ``scalecert-figure``, ``scalecert-status``) for the
browser test (``tests/browser/run_browser.py``).
"""

from __future__ import annotations

import html
import io
import time

from . import data as D
from . import experiments as E
from . import explorer as X
from .windows import patch_pixels

#: patch sizes offered per data set (% of the image): the paper's Tables 2 and 5
PATCH_SIZES = {name: sorted(set(E.PATCHES[name]) | set(E.LARGE_PATCHES[name])) for name in E.PATCHES}


class ExplorerUI:
    """The explorer's widgets; ``widget`` is the box to display, ``setting`` the current setting, ``panel`` the last
    panel shown, ``refresh()`` recomputes it."""

    def __init__(self, explorer: X.Explorer, setting: X.Setting | None = None, dpi: int = 90):
        import ipywidgets as W

        self.ex, self.dpi = explorer, dpi
        s = explorer.check(setting or X.Setting())
        self._quiet = True  # no refresh while the widgets are being set
        style = {"description_width": "70px"}
        lay = W.Layout(width="260px")
        self.w_dataset = W.Dropdown(
            options=[(D.DATASET_LABELS[k], k) for k in E.PATCHES],
            value=s.dataset,
            description="data set",
            style=style,
            layout=lay,
        )
        self.w_model = W.Dropdown(description="model", style=style, layout=W.Layout(width="340px"))
        self.w_image = W.BoundedIntText(description="image", min=0, style=style, layout=W.Layout(width="170px"))
        self.w_class = W.Dropdown(description="class", style=style, layout=lay)
        self.w_patch = W.Dropdown(description="patch %", style=style, layout=W.Layout(width="170px"))
        self.w_row = W.IntSlider(
            description="patch row", continuous_update=False, style=style, layout=W.Layout(width="340px")
        )
        self.w_col = W.IntSlider(
            description="patch col", continuous_update=False, style=style, layout=W.Layout(width="340px")
        )
        self.w_content = W.Dropdown(
            options=list(X.CONTENTS), value=s.content, description="content", style=style, layout=lay
        )
        self.w_mode = W.ToggleButtons(options=list(X.MODES), value=s.mode, description="mode", style=style)
        self.w_tau = W.FloatSlider(
            min=0.1,
            max=1.0,
            step=0.05,
            continuous_update=False,
            description="tau",
            style=style,
            layout=W.Layout(width="340px"),
            tooltip="window merging; 1 = none",
        )
        self.w_r = W.IntSlider(
            min=1, max=5, continuous_update=False, description="r", style=style, layout=W.Layout(width="340px")
        )
        self.w_status = W.HTML()
        self.w_verdict = W.HTML()
        self.w_figure = W.Image(format="png", layout=W.Layout(max_width="100%"))
        for w, cls in (
            (self.w_row, "scalecert-row"),
            (self.w_col, "scalecert-col"),
            (self.w_verdict, "scalecert-verdict"),
            (self.w_figure, "scalecert-figure"),
            (self.w_status, "scalecert-status"),
            (self.w_image, "scalecert-image"),
            (self.w_content, "scalecert-content"),
        ):
            w.add_class(cls)
        self._set_dataset_options(s)
        self.widget = W.VBox(
            [
                W.HBox([self.w_dataset, self.w_model, self.w_image, self.w_class]),
                W.HBox([self.w_patch, self.w_content, self.w_row, self.w_col]),
                W.HBox([self.w_mode, self.w_tau, self.w_r]),
                self.w_status,
                self.w_verdict,
                self.w_figure,
            ]
        )
        self.w_dataset.observe(self._on_dataset, "value")
        self.w_class.observe(self._on_class, "value")
        self.w_patch.observe(self._on_patch, "value")
        for w in (
            self.w_model,
            self.w_image,
            self.w_row,
            self.w_col,
            self.w_content,
            self.w_mode,
            self.w_tau,
            self.w_r,
        ):
            w.observe(self._on_change, "value")
        self._quiet = False
        self.panel = None

    # widgets <-> setting
    def _set_dataset_options(self, s: X.Setting) -> None:
        ds = self.ex.dataset(s.dataset)
        self.w_model.options = X.shipped_models(s.dataset)
        self.w_model.value = s.model
        self.w_image.max = len(ds) - 1
        self.w_image.value = s.image
        self.w_class.options = [(c, k) for k, c in enumerate(ds.classes)]
        self.w_class.value = int(ds.labels[s.image])
        self.w_patch.options = PATCH_SIZES[s.dataset]
        self.w_patch.value = s.patch_pct if s.patch_pct in PATCH_SIZES[s.dataset] else PATCH_SIZES[s.dataset][0]
        self._set_position_range(s.dataset, s.patch_pct, s.position)
        self.w_tau.value = 1.0 if s.tau is None else s.tau
        self.w_r.value = s.r

    def _set_position_range(self, dataset: str, pct: float, position) -> None:
        n = D.image_size(dataset)
        last = n - patch_pixels(float(pct), n)
        for w, v in ((self.w_row, position[0]), (self.w_col, position[1])):
            w.max = last
            w.value = min(v, last)

    @property
    def setting(self) -> X.Setting:
        return X.Setting(
            self.w_dataset.value,
            self.w_model.value,
            int(self.w_image.value),
            float(self.w_patch.value),
            (int(self.w_row.value), int(self.w_col.value)),
            self.w_content.value,
            self.w_mode.value,
            None if self.w_tau.value >= 1 else round(float(self.w_tau.value), 4),
            int(self.w_r.value),
        )

    def set(self, setting: X.Setting) -> dict:
        """Set every widget from a setting and show its panel (what the headless demo drives)."""
        s = self.ex.check(setting)
        self._quiet = True
        try:
            self.w_dataset.value = s.dataset
            self._set_dataset_options(s)
            self.w_content.value, self.w_mode.value = s.content, s.mode
        finally:
            self._quiet = False
        return self.refresh()

    # events
    def _on_dataset(self, change) -> None:
        if self._quiet:
            return
        name = change["new"]
        n = D.image_size(name)
        pct = PATCH_SIZES[name][-3] if len(PATCH_SIZES[name]) >= 3 else PATCH_SIZES[name][0]
        c = (n - patch_pixels(pct, n)) // 2
        self.set(
            X.Setting(
                name, None, 0, pct, (c, c), self.w_content.value, self.w_mode.value, "default", int(self.w_r.value)
            )
        )

    def _on_class(self, change) -> None:
        if self._quiet:
            return
        ds = self.ex.dataset(self.w_dataset.value)
        first = int((ds.labels == change["new"]).nonzero()[0][0])
        self._quiet = True
        self.w_image.value = first
        self._quiet = False
        self.refresh()

    def _on_patch(self, change) -> None:
        if self._quiet:
            return
        self._quiet = True
        self._set_position_range(self.w_dataset.value, change["new"], (self.w_row.value, self.w_col.value))
        self._quiet = False
        self.refresh()

    def _on_change(self, change) -> None:
        if self._quiet:
            return
        if change["owner"] is self.w_image:
            ds = self.ex.dataset(self.w_dataset.value)
            self._quiet = True
            self.w_class.value = int(ds.labels[int(change["new"])])
            self._quiet = False
        self.refresh()

    # rendering
    def refresh(self) -> dict | None:
        """Compute the panel of the widgets' setting and show it; return it (None, the error shown, on bad input)."""
        s = self.setting
        slow = s.dataset != "cifar10" or s.content == "pgd"
        self.w_status.value = "<i>computing…</i>" + (" (Imagenette and PGD patches take a few seconds)" if slow else "")
        t0 = time.perf_counter()
        try:
            pan = self.ex.update(s)
        except ValueError as e:
            self.w_status.value = f"<b>error:</b> {html.escape(str(e))}"
            return None
        classes = self.ex.classes(s.dataset)
        fig = X.figure(
            pan,
            classes,
            title=f"{D.DATASET_LABELS[s.dataset]} image {s.image}, {pan['setting'].model}, "
            f"{s.patch_pct:g}% patch ({pan['p']} px) at {pan['position']}, {s.content}",
            timings=True,
        )
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi)
        self.w_figure.value = buf.getvalue()
        self.w_verdict.value = "<pre style='margin:0'>" + html.escape(X.verdict_text(pan, classes)) + "</pre>"
        pan["seconds_shown"] = time.perf_counter() - t0
        self.w_status.value = (
            f"updated in {pan['seconds_shown']:.2f} s, patch at {pan['position']} (panel "
            f"{pan['seconds']:.2f} s: detect {pan['detect']['seconds']:.2f} s, SIN clusters "
            f"{pan['sin']['seconds']:.2f} s)"
        )
        self.panel = pan
        return pan
