"""The claims table: the verdict rule, its coverage of the paper's claims, and the README block it writes."""

import math
import shutil

import pandas as pd
import pytest

from scalecert import claims as C
from scalecert import experiments as E


@pytest.mark.parametrize(
    "paper, ours, better, tol, want",
    [
        (55.4, 60.9, "higher", 5.0, "reproduced"),  # beyond the paper in the claim's direction
        (55.4, 50.4, "higher", 5.0, "reproduced"),  # exactly at the tolerance
        (55.4, 50.3, "higher", 5.0, "not reproduced"),  # just past it
        (7.9, 12.9, "lower", 5.0, "reproduced"),
        (7.9, 66.3, "lower", 5.0, "not reproduced"),
        (100.0, 100.0, "lower", 0.0, "reproduced"),  # a bound without tolerance
        (100.0, 100.1, "lower", 0.0, "not reproduced"),
        (-0.6, 4.4, "lower", 5.0, "reproduced"),  # differences in points follow the same rule
        (50.0, 64.4 - 9.4, "lower", 5.0, "reproduced"),  # 55.00000000000001: compared as printed, not as binary floats
        (math.nan, 96.0, "higher", 5.0, "not testable here"),
        (82.1, math.nan, "higher", 5.0, "not testable here"),
    ],
)
def test_verdict_rule_on_hand_made_rows(paper, ours, better, tol, want):
    assert C.verdict(paper, ours, better, tol)[0] == want


def test_verdict_reason_says_how_far_and_which_way():
    assert C.verdict(75.3, 47.3, "higher") == ("not reproduced", "28.0 below the paper's")
    assert C.verdict(85.8, 87.1, "higher") == ("reproduced", "1.3 above the paper's")
    assert C.verdict(0.0, 0.0, "lower", 0.0) == ("reproduced", "equal to the paper's")
    assert C.verdict(219.0, 295.0, "lower", untestable="no GPU here") == ("not testable here", "no GPU here")
    with pytest.raises(ValueError):
        C.threshold(1.0, "closer", 5.0)


def test_table_holds_every_claim_with_a_verdict():
    df = C.claims()
    assert set(C.KINDS) <= set(df.kind), set(C.KINDS) - set(df.kind)
    assert set(df.verdict) <= set(C.VERDICTS) and not df.ours.isna().any()
    cert = df[df.kind == "certified accuracy"]
    for ds, data in C.DATA.items():  # every headline patch size of Tables 2 and 5, on both data sets
        sizes = {f"{p:g}% patch" for p in E.PATCHES[ds] + E.LARGE_PATCHES[ds]}
        assert {c.split(", ")[1].split(" (")[0] for c in cert[cert.data == data].claim} == sizes
    # the paper's numbers come from data/paper, ours from the committed whole-split tables
    row = cert[(cert.data == C.DATA["imagenette"]) & cert.claim.str.contains(" 2% patch")].iloc[0]
    t2 = E.paper_table("table2_certified", "imagenette")
    assert row.paper == t2[(t2.patch_pct == 2) & (t2.defense == "ScaleCert")].certified.item()
    whole = C.ours_table("imagenette", "05_whole_splits")
    assert row.ours == whole[(whole.patch_pct == 2) & (whole.defense == "ScaleCert")].certified.item()
    assert row.images == 3925
    md = C.markdown()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert all(claim in md for claim in df.claim) and len(rows) == 1 + len(set(df.data)) + len(df)  # header, groups


def test_a_changed_result_changes_its_verdict(tmp_path):
    shutil.copytree(C.FIG_DIR, tmp_path / "paper", ignore=shutil.ignore_patterns("*.png", "*.pdf"))
    path = tmp_path / "paper" / "imagenette" / "05_whole_splits.csv"
    df = pd.read_csv(path)
    df.loc[(df.patch_pct == 2) & (df.defense == "ScaleCert"), "certified"] = 40.0
    df.to_csv(path, index=False)
    before, after = C.claims(), C.claims(tmp_path / "paper")
    changed = before.verdict != after.verdict
    assert after[changed].claim.tolist() == ["Certified accuracy (%), 2% patch (Table 2)"]
    assert after[changed].verdict.item() == "not reproduced"


def test_readme_block_is_what_the_command_generates_today():
    # fails when the README is stale: run `make readme` (python -m scalecert.claims --readme) and commit it
    assert C.block(C.README.read_text()) == C.markdown()
    assert C.block(C.README.read_text(), "ablation") == C.ablation_markdown()
    assert C.block(C.README.read_text(), "patchcleanser") == C.patchcleanser_markdown()


def test_readme_stays_a_short_companion():
    # the README is a companion to the paper: at most 12,000 bytes, generated blocks included
    assert len(C.README.read_bytes()) <= 12_000


def test_write_readme_replaces_only_the_block(tmp_path):
    p = tmp_path / "README.md"
    blocks = "".join(f"{start}\nold\n{end}\n\nmiddle\n" for start, end, _ in C.BLOCKS.values())
    p.write_text(f"# title\n\n{blocks}tail\n")
    assert C.write_readme(p) and not C.write_readme(p)
    text = p.read_text()
    assert text.startswith("# title\n\n") and text.endswith(f"{C.PC_END}\n\nmiddle\ntail\n")
    assert f"{C.END}\n\nmiddle\n{C.ABL_START}" in text and f"{C.ABL_END}\n\nmiddle\n{C.PC_START}" in text
    assert C.block(text) == C.markdown() and C.block(text, "ablation") == C.ablation_markdown()
    assert C.block(text, "patchcleanser") == C.patchcleanser_markdown()
    p.write_text("no markers\n")
    with pytest.raises(ValueError):
        C.write_readme(p)


def test_ablation_block_summarises_each_data_sets_verdicts_and_points_at_the_notebooks_tables(tmp_path):
    assert C.ablation_markdown(tmp_path).startswith("No whole-split verdict yet")
    (tmp_path / "imagenette").mkdir()
    (tmp_path / "cifar10").mkdir()
    row = {"dataset": "Imagenette-224", "patch_pct": 2.0, "family": "k=6 masks", "images": 3925,
           "scalecert_certified": 61.25, "mr_occl_certified": 58.0, "difference": 3.2, "ci_low": 2.1, "ci_high": 4.4,
           "p_value": 1.2e-8}  # fmt: skip
    pd.DataFrame([row]).to_csv(tmp_path / "imagenette" / "12_verdict.csv", index=False)
    pd.DataFrame(
        [
            {**row, "dataset": "CIFAR-10 (JPEG)", "patch_pct": 2.4, "images": 10000, "difference": -6.4,
             "ci_low": -7.2, "ci_high": -5.5, "p_value": 2.6e-49},
            {**row, "dataset": "CIFAR-10 (JPEG)", "patch_pct": 0.4, "images": 10000, "difference": 0.3,
             "ci_low": -0.5, "ci_high": 1.1, "p_value": 0.41},
        ]
    ).to_csv(tmp_path / "cifar10" / "12_verdict.csv", index=False)  # fmt: skip
    (tmp_path / "imagenette" / "12_answer.md").write_text("Imagenette-224: SIN adds certified accuracy.\n")
    text = C.ablation_markdown(tmp_path)
    # the paper's own difference at the same sizes (Table 2: 81.0 - 82.5 at 0.4%, 75.3 - 78.1 at 2.4%; no ImageNet MR)
    assert "| CIFAR-10 (JPEG) | 2 | 10,000 | -6.4 to +0.3 | 1 / 1 / 0 | 0.41 | -2.8 to -1.5 (0.4%, 2.4%) |" in text
    assert "| Imagenette-224 | 1 | 3,925 | +3.2 [+2.1, +4.4] | 0 / 0 / 1 | 1.2e-08 | no MR row |" in text
    assert "12_answer.md" in text.splitlines()[-1] and "SIN adds" not in text  # the answers stay in the notebook's file


def test_patchcleanser_block_puts_whole_split_rows_beside_scalecert(tmp_path):
    assert C.patchcleanser_markdown(tmp_path).startswith("No whole-split run yet")
    (tmp_path / "cifar10").mkdir()
    base = {"dataset": "CIFAR-10 (JPEG)", "guarantee": "detection", "clean": 80.0, "note": None}
    rows = [
        {**base, "patch_pct": 2.4, "defense": "ScaleCert", "images": 10000, "certified": 47.3,
         "forwards_per_image": 25.8, "inference_forwards": 40.2, "certify_forwards": 40.2},
        {**base, "patch_pct": 0.4, "defense": "ScaleCert", "images": 10000, "certified": 59.4,
         "forwards_per_image": 30.0, "inference_forwards": 44.0, "certify_forwards": 44.0},
        {**base, "patch_pct": 2.4, "defense": "PatchCleanser (occlusion-trained)", "guarantee": "recovery",
         "images": 10000, "certified": 35.66, "forwards_per_image": 300.4, "inference_forwards": 101.2,
         "certify_forwards": 666},
        {**base, "patch_pct": 0.4, "defense": "PatchCleanser (occlusion-trained)", "guarantee": "recovery",
         "images": 10, "certified": 50.0, "forwards_per_image": 290, "inference_forwards": 90,
         "certify_forwards": 666},  # a subset: left out
        {**base, "patch_pct": 0.4, "defense": "PatchCleanser (undefended model)", "guarantee": "recovery",
         "images": None, "certified": None, "forwards_per_image": None, "inference_forwards": None,
         "certify_forwards": None, "note": "not computed yet"},
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "cifar10" / "05_certification.csv", index=False)
    lines = C.patchcleanser_markdown(tmp_path).splitlines()
    body = [line for line in lines if line.startswith("| CIFAR")]
    assert len(body) == 1  # 2.4% only: the 0.4% PatchCleanser row covers 10 images
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    assert cells == ["CIFAR-10 (JPEG)", "2.4%", "10,000", "47.3 (40 / 26)", "35.7 (101 / 300)", "not computed yet"]
    t = pd.DataFrame(rows)
    t = t[~((t.defense == "ScaleCert") & (t.patch_pct == 2.4))]  # no whole-split ScaleCert row at 2.4%
    t.to_csv(tmp_path / "cifar10" / "05_certification.csv", index=False)
    body = [line for line in C.patchcleanser_markdown(tmp_path).splitlines() if line.startswith("| CIFAR")]
    assert [c.strip() for c in body[0].strip("|").split("|")][3] == "not computed yet"
