"""The paper's claims beside this study's whole-split results, one row per claim with a verdict (README table)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import pandas as pd

from . import experiments as E
from .paths import PAPER_FIG_DIR, ROOT

#: the paper-profile tables the notebooks write from the result cache, one folder per data set
FIG_DIR = PAPER_FIG_DIR
README = ROOT / "README.md"
START, END = "<!-- claims:start -->", "<!-- claims:end -->"
_BLOCK = re.escape(START) + r"\n?(.*?)\n?" + re.escape(END)
ABL_START, ABL_END = "<!-- ablation:start -->", "<!-- ablation:end -->"
_ABL_BLOCK = re.escape(ABL_START) + r"\n?(.*?)\n?" + re.escape(ABL_END)
PC_START, PC_END = "<!-- patchcleanser:start -->", "<!-- patchcleanser:end -->"
_PC_BLOCK = re.escape(PC_START) + r"\n?(.*?)\n?" + re.escape(PC_END)
#: the README's generated blocks: markers and pattern by name
BLOCKS = {
    "claims": (START, END, _BLOCK),
    "ablation": (ABL_START, ABL_END, _ABL_BLOCK),
    "patchcleanser": (PC_START, PC_END, _PC_BLOCK),
}
#: tolerance of the verdict rule for numbers in percent or percentage points
TOL = 5.0
VERDICTS = ("reproduced", "not reproduced", "not testable here")
#: what the table must cover (the claim kinds of the paper)
KINDS = (
    "certified accuracy",
    "margin over the best peer",
    "SIN localisation",
    "prediction stability",
    "adaptive attack",
    "tau trade-off",
    "layer choice",
    "candidate reduction",
    "recovery",
    "soundness",
)
DATA = {
    "cifar10": "paper: CIFAR-10, ResNet-18; ours: CIFAR-10 (JPEG), ResNet-20",
    "imagenette": "paper: ImageNet, ResNet-50; ours: Imagenette-224, ResNet-18 (width 16)",
}
COLUMNS = ["kind", "claim", "data", "paper", "ours", "images", "better", "tol", "untestable"]


def threshold(paper: float, better: str, tol: float) -> float:
    """Return the bound ours must reach: paper - tol when higher is the claim, paper + tol when lower is."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    return paper - tol if better == "higher" else paper + tol


def verdict(paper: float, ours: float, better: str, tol: float = TOL, untestable: str = "") -> tuple[str, str]:
    """Return (verdict, reason): reproduced iff ours reaches threshold(); no number or a reason given: not testable."""
    if untestable:
        return "not testable here", untestable
    if paper is None or ours is None or math.isnan(paper) or math.isnan(ours):
        return "not testable here", "no number to compare"
    # rounded so that differences of the tables' one-decimal numbers compare as printed
    bound, mine, gap = round(threshold(paper, better, tol), 6), round(ours, 6), round(ours - paper, 6)
    ok = mine >= bound if better == "higher" else mine <= bound
    reason = "equal to the paper's" if gap == 0 else f"{abs(gap):.1f} {'above' if gap > 0 else 'below'} the paper's"
    return ("reproduced" if ok else "not reproduced"), reason


def ours_table(dataset: str, name: str, fig_dir: Path = FIG_DIR) -> pd.DataFrame:
    """Return one committed paper-profile table of a data set (figures/paper/DATASET/NAME.csv)."""
    return pd.read_csv(Path(fig_dir) / dataset / f"{name}.csv")


def _row(kind, claim, data, paper, ours, images, better="higher", tol=TOL, untestable="") -> dict:
    """Return one claim as a dict of COLUMNS."""
    return dict(zip(COLUMNS, (kind, claim, data, float(paper), float(ours), int(images), better, tol, untestable)))


def _one(df: pd.DataFrame, col: str, **where) -> float:
    """Return the single value of col in the rows matching every column=value in where (error if not exactly one)."""
    hit = df
    for k, v in where.items():
        hit = hit[hit[k] == v]
    if len(hit) != 1:
        raise ValueError(f"expected one row with {where}, found {len(hit)}")
    return float(hit[col].iloc[0])


def _certification(fig_dir: Path) -> list[dict]:
    """Return the certified-accuracy rows (Tables 2 and 5, ScaleCert sound mode) and the margin over the best peer."""
    rows = []
    for ds in ("cifar10", "imagenette"):
        ours, paper = ours_table(ds, "05_whole_splits", fig_dir), E.paper_table("table2_certified", ds)
        for p in E.PATCHES[ds] + E.LARGE_PATCHES[ds]:
            table = "Table 2" if p in E.PATCHES[ds] else "Table 5, appendix"
            rows.append(
                _row(
                    "certified accuracy",
                    f"Certified accuracy (%), {p:g}% patch ({table})",
                    DATA[ds],
                    _one(paper, "certified", patch_pct=p, defense="ScaleCert"),
                    _one(ours, "certified", patch_pct=p, defense="ScaleCert"),
                    _one(ours, "images", patch_pct=p, defense="ScaleCert"),
                )
            )
        # Table 1's headline size on ImageNet; the larger of Table 2's sizes on CIFAR-10
        p = {"cifar10": 2.4, "imagenette": 1.0}[ds]
        peers_paper = paper[(paper.patch_pct == p) & (paper.defense != "ScaleCert")]
        peers_ours = ours[(ours.patch_pct == p) & ours.defense.isin(peers_paper.defense)]
        best = peers_ours.loc[peers_ours.certified.idxmax()]
        rows.append(
            _row(
                "margin over the best peer",
                f"Certified margin over the best peer (points), {p:g}% patch (Table 2; ours: {best.defense})",
                DATA[ds],
                _one(paper, "certified", patch_pct=p, defense="ScaleCert") - peers_paper.certified.max(),
                _one(ours, "certified", patch_pct=p, defense="ScaleCert") - best.certified,
                best.images,
            )
        )
    return rows


def _analyses(fig_dir: Path) -> list[dict]:
    """Return the rows of Fig. 1 (SIN localisation, prediction stability, adaptive attack) on Imagenette-224."""
    ds, data = "imagenette", DATA["imagenette"]
    n = int(ours_table(ds, "05_whole_splits", fig_dir).images.max())
    loc, fig1c = ours_table(ds, "02_sin_localization", fig_dir), E.fig1c_paper()
    stab, att = ours_table(ds, "03_prediction_stability", fig_dir), ours_table(ds, "04_adaptive_attack", fig_dir)
    one, more = "patched images with exactly one cluster (%)", "benign images with more than three clusters (%)"
    no_number = "Fig. 1d gives no number"
    return [
        _row(
            "SIN localisation",
            "Patched images whose SINs form one MeanShift cluster (%, Fig. 1c)",
            data,
            fig1c[one],
            _one(loc, "ours", statistic=one),
            n,
        ),
        _row(
            "SIN localisation",
            "Benign images with more than three SIN clusters (%, Fig. 1c: over 75)",
            data,
            fig1c[more],
            _one(loc, "ours", statistic=more),
            n,
        ),
        _row(
            "prediction stability",
            "Benign accuracy after removing the localised SINs (%, Fig. 1d)",
            data,
            math.nan,
            _one(stab, "after_removing_localised_sins", images="benign"),
            _one(stab, "n", images="benign"),
            untestable=no_number,
        ),
        _row(
            "prediction stability",
            "Patched accuracy after removing the localised SINs (%, Fig. 1d)",
            data,
            math.nan,
            _one(stab, "after_removing_localised_sins", images="patched"),
            _one(stab, "n", images="patched"),
            untestable=no_number,
        ),
        _row(
            "adaptive attack",
            "Detection rate of the SIN-evading patch at α = 0.01 (%, Fig. 1e)",
            data,
            E.paper_figure("fig1e_detection_rate_at_alpha_0.01"),
            _one(att, "detection_rate", alpha=0.01),
            n,
        ),
        _row(
            "adaptive attack",
            "Success of the SIN-evading patch at α = 0.01 (%, Fig. 1e)",
            data,
            E.paper_figure("fig1e_attack_success_at_alpha_0.01"),
            _one(att, "attack_success", alpha=0.01),
            n,
            better="lower",
        ),
    ]


def _design(fig_dir: Path) -> list[dict]:
    """Return the rows of the design choices and cost (Tables 4 and 7, Sec. 4), the recovery and the soundness claim."""
    ds, data = "imagenette", DATA["imagenette"]
    merge, t4 = ours_table(ds, "07_window_merging", fig_dir), E.paper_table("table4_overlap_ratio", ds)
    layer, t7 = ours_table(ds, "08_layer_selection", fig_dir), E.paper_table("table7_layer_selection", ds)
    cert, rec = ours_table(ds, "05_certification", fig_dir), ours_table(ds, "09_empirical_recovery", fig_dir)
    audits = pd.concat([ours_table(d, "10_soundness_audit", fig_dir) for d in ("cifar10", "imagenette")])
    paper_mode = audits[audits["mode"] == "paper"]
    n = int(cert.images.max())
    sc = merge[merge.defense == "ScaleCert"]
    deeper = t7[t7.superficial_layer > 1].certified.max()
    return [
        _row(
            "tau trade-off",
            "Certified accuracy gained by merging less, τ = 0.6 vs 0.3 (points, 2% patch, Table 4)",
            data,
            _one(t4, "certified", tau=0.6) - _one(t4, "certified", tau=0.3),
            _one(sc, "certified", tau=0.6) - _one(sc, "certified", tau=0.3),
            n,
            better="lower",
        ),
        _row(
            "tau trade-off",
            "Latency per image at τ = 0.3, 2% patch (ms, Table 4; ours on the CPU)",
            data,
            _one(t4, "latency_ms_v100", tau=0.3),
            _one(sc, "latency_ms", tau=0.3),
            n,
            better="lower",
            untestable="V100 latency; no GPU here",
        ),
        _row(
            "layer choice",
            "Certified margin of SIN layer 1 over the best deeper layer (points, 2% patch, Table 7)",
            data,
            _one(t7, "certified", superficial_layer=1) - deeper,
            _one(layer, "certified", superficial_layer=1) - layer[layer.superficial_layer > 1].certified.max(),
            n,
        ),
        _row(
            "candidate reduction",
            "Candidate windows per image, 2% patch (Sec. 4.2: fewer than 100)",
            data,
            E.paper_figure("scalecert_candidates_max"),
            _one(cert, "candidates", patch_pct=2.0, defense="ScaleCert"),
            n,
            better="lower",
            tol=0.0,
        ),
        _row(
            "recovery",
            "Accuracy after tearing off the localised 5% patch (%, Sec. 4.4)",
            data,
            E.paper_figure("sec4_4_acc_after_recovery"),
            float(rec.recovered_acc.iloc[0]),
            int(rec.images.iloc[0]),
        ),
        _row(
            "soundness",
            "Certificate violations of the paper's procedure under attack (Theorem 1, Sec. 3.3: none)",
            "paper: any data set; ours: both, 100 images each",
            0.0,
            float(paper_mode.violations.sum()),
            int(paper_mode.images.sum()),
            better="lower",
            tol=0.0,
        ),
    ]


def claims(fig_dir: Path = FIG_DIR) -> pd.DataFrame:
    """Return every claim with the paper's number, ours, the bound ours must reach, the verdict and its reason."""
    fig_dir = Path(fig_dir)
    df = pd.DataFrame(_certification(fig_dir) + _analyses(fig_dir) + _design(fig_dir), columns=COLUMNS)
    judged = [verdict(r.paper, r.ours, r.better, r.tol, r.untestable) for r in df.itertuples()]
    df["verdict"], df["reason"] = [v for v, _ in judged], [why for _, why in judged]
    return df


def _num(x: float, signed: bool = False) -> str:
    """Return a number as the table prints it: one decimal (whole counts without), a sign for differences."""
    if math.isnan(x):
        return "–"
    whole = float(x).is_integer() and (abs(x) >= 100 or x == 0)
    s = f"{x:+.1f}" if signed else (f"{x:.0f}" if whole else f"{x:.1f}")
    return s.replace("-", "−")


def markdown(fig_dir: Path = FIG_DIR) -> str:
    """Return the claims table in Markdown with the rule it applies and a count of the verdicts."""
    df = claims(fig_dir)
    lines = [
        "| claim (paper's source) | paper | ours | images | reproduced if ours | verdict |",
        "|---|--:|--:|--:|---|---|",
    ]
    data = None
    for r in df.itertuples():
        if r.data != data:
            data = r.data
            lines.append(f"| **{data}** ||||||")
        signed = "(points" in r.claim  # a difference in percentage points
        bound = (
            ""
            if r.untestable or math.isnan(r.paper)
            else f"{'≥' if r.better == 'higher' else '≤'} {_num(threshold(r.paper, r.better, r.tol), signed)}"
        )
        lines.append(
            f"| {r.claim} | {_num(r.paper, signed)} | {_num(r.ours, signed)} | {r.images:,} | "
            f"{bound} | **{r.verdict}**: {r.reason} |"
        )
    counts = df.verdict.value_counts()
    tally = ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)
    lines += [
        "",
        "Rule (`scalecert.claims.verdict`): a claim is *reproduced* when ours is at least the paper's number "
        f"minus {TOL:g} points (at most plus {TOL:g} when lower is the claim; no tolerance for the bounds "
        '"fewer than 100" and "none"), *not testable here* when the paper gives no number or needs what '
        "this study lacks. Ours: ScaleCert in sound mode (the paper's procedure where the claim says so) "
        f"on the whole test/val split, unless `images` says less. {tally}.",
    ]
    return "\n".join(lines)


def block(text: str, which: str = "claims") -> str:
    """Return the part of a README between the markers of one generated block (``BLOCKS``: claims, ablation,
    patchcleanser); ValueError if they are missing."""
    start, end, pattern = BLOCKS[which]
    m = re.search(pattern, text, flags=re.S)
    if m is None:
        raise ValueError(f"no {start} ... {end} block")
    return m.group(1)


def paper_sc_minus_mr(dataset: str, patches) -> str:
    """Return the paper's ScaleCert minus MR certified accuracy (Table 2, points) at these patch sizes: one number,
    a range, or a note where the paper has no MR row (it reports MR on CIFAR-10 only)."""
    t = E.paper_table("table2_certified", dataset)
    t = t[t.patch_pct.isin([float(p) for p in patches])].pivot_table(
        index="patch_pct", columns="defense", values="certified"
    )
    if not {"ScaleCert", "MR"} <= set(t.columns) or t[["ScaleCert", "MR"]].dropna().empty:
        return "no MR row"
    d = (t.ScaleCert - t.MR).dropna()
    where = ", ".join(f"{p:g}%" for p in d.index)
    if len(d) == 1:
        return f"{d.iloc[0]:+.1f} ({where})"
    return f"{d.min():+.1f} to {d.max():+.1f} ({where})"


def ablation_markdown(fig_dir: Path = FIG_DIR) -> str:
    """Return notebook 12's whole-split verdicts (``12_verdict.csv`` of each data set's paper-profile folder) as a
    Markdown table with one row per data set (pairs, range of ScaleCert (sound) minus MR on the occlusion-trained
    twin, how many 95% intervals lie below, across and above 0, the largest p, and the paper's own ScaleCert minus MR
    at the same patch sizes from its Table 2), and a pointer to the per-pair tables and the notebook's answers
    (``12_answer.md``); a line saying so where there is none yet."""
    frames = []
    for name in DATA:
        csv = Path(fig_dir) / name / "12_verdict.csv"
        if csv.is_file():
            frames.append(pd.read_csv(csv).assign(key=name))
    v = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if v.empty:
        return (
            "No whole-split verdict yet: `python -m scalecert ablation --dataset D` computes 12's runs, then the paper "
            "profile of `notebooks/12_does_sin_help.ipynb` writes `figures/paper/D/12_verdict.csv`."
        )
    lines = [
        "| data set | (patch, family) pairs | images each | ScaleCert (sound) − MR (occlusion-trained), points "
        "| 95% CI below 0 / across 0 / above 0 | largest McNemar p | paper (Table 2): ScaleCert − MR |",
        "|---|--:|--:|---|---|--:|---|",
    ]
    for ds, g in v.groupby("dataset", sort=False):
        below, above = int((g.ci_high < 0).sum()), int((g.ci_low > 0).sum())
        if len(g) == 1:
            diff = f"{g.difference.iloc[0]:+.1f} [{g.ci_low.iloc[0]:+.1f}, {g.ci_high.iloc[0]:+.1f}]"
        else:
            diff = f"{g.difference.min():+.1f} to {g.difference.max():+.1f}"
        images = f"{g.images.min():,}" if g.images.nunique() == 1 else f"{g.images.min():,} to {g.images.max():,}"
        lines.append(
            f"| {ds} | {len(g)} | {images} | {diff} | {below} / {len(g) - below - above} / {above} "
            f"| {g.p_value.max():.2g} | {paper_sc_minus_mr(g.key.iloc[0], sorted(g.patch_pct.unique()))} |"
        )
    note = (
        "Negative: MR on the twin certifies more. Every pair (patch, family, both accuracies, interval, p): "
        "`figures/paper/*/12_verdict.md`; the notebook's answer per data set: `figures/paper/*/12_answer.md`."
    )
    return "\n".join(lines + ["", note])


def patchcleanser_markdown(fig_dir: Path = FIG_DIR) -> str:
    """Return 05's whole-split PatchCleanser rows (``05_certification.csv`` of each data set's paper-profile folder)
    beside ScaleCert (sound) at the same patch size as a Markdown table: certified accuracy and forward passes per
    image (at inference, then spent by the certification run); a line saying so where there is none yet."""
    lines = []
    for name in DATA:
        csv = Path(fig_dir) / name / "05_certification.csv"
        if not csv.is_file():
            continue
        t = pd.read_csv(csv)
        pc = t[t.defense.str.startswith("PatchCleanser") & t.certified.notna()]
        whole = t.images.max()  # the split's size: the paper profile's rows cover the whole split
        for patch, g in pc[pc.images == whole].groupby("patch_pct", sort=True):
            sc = t[(t.defense == "ScaleCert") & (t.patch_pct == patch) & (t.images == whole)]
            cells = [g.dataset.iloc[0], f"{patch:g}%", f"{int(whole):,}"]
            for r in [sc] + [
                g[g.defense == f"PatchCleanser ({label})"] for label in ("occlusion-trained", "undefended model")
            ]:
                r = r.iloc[0] if len(r) else None
                cells.append(
                    "not computed yet"
                    if r is None
                    else f"{r.certified:.1f} ({r.inference_forwards:.0f} / {r.forwards_per_image:.0f})"
                )
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return (
            "No whole-split run yet (`python -m scalecert ablation --dataset D --defences pc_occl,pc_vanilla`, then "
            "05's paper profile)."
        )
    head = [
        "| data set | patch | images | ScaleCert (sound) | PatchCleanser (twin) | PatchCleanser (undefended) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    note = (
        "Certified accuracy, % (forward passes per image: at inference / in the certification run, which leaves an "
        "image once its certificate is ruled out). ScaleCert certifies detection (the right label or an alert), "
        "PatchCleanser recovery (the right label)."
    )
    return "\n".join(head + lines + ["", note])


def write_readme(path: Path = README, fig_dir: Path = FIG_DIR) -> bool:
    """Rewrite the generated blocks of a README (claims, ablation, PatchCleanser) from the committed tables; return
    True iff it changed."""
    path = Path(path)
    text = path.read_text()
    makers = {"claims": markdown, "ablation": ablation_markdown, "patchcleanser": patchcleanser_markdown}
    for which in BLOCKS:
        block(text, which)  # the markers must be there
    new = text
    for which, (start, end, pattern) in BLOCKS.items():
        new = re.sub(pattern, lambda m, w=which, s_=start, e_=end: f"{s_}\n{makers[w](fig_dir)}\n{e_}", new, flags=re.S)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None) -> int:
    """Print the claims table, or with --readme write it between the markers of README.md."""
    p = argparse.ArgumentParser(prog="python -m scalecert.claims", description=main.__doc__)
    p.add_argument(
        "--readme", nargs="?", const=str(README), help="write the table into this README (default README.md)"
    )
    p.add_argument(
        "--fig-dir", default=str(FIG_DIR), help="folder of the paper-profile tables (one folder per data set)"
    )
    a = p.parse_args(argv)
    if a.readme:
        changed = write_readme(Path(a.readme), Path(a.fig_dir))
        print(f"{a.readme}: claims table {'rewritten' if changed else 'already current'}")
    else:
        print(markdown(Path(a.fig_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
