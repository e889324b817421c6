import pandas as pd
import pytest

from scalecert.report import comparisons, sections


def test_comparison_line_is_computed_from_the_numbers():
    df = pd.DataFrame(
        {"certified": [70.0, 50.0, None], "paper_certified": [75.3, 55.4, 60.0], "clean": [80.0, 60.0, 1.0]}
    )
    lines = comparisons(df)
    assert len(lines) == 1
    assert "mean -5.3 over 2 rows" in lines[0] and "min -5.4, max -5.3" in lines[0]


def test_sections_list_every_table_and_its_figures(tmp_path):
    pd.DataFrame({"ours": [1.0], "paper": [2.0]}).to_csv(tmp_path / "05_certification.csv", index=False)
    (tmp_path / "05_certification_cifar10.png").write_bytes(b"")
    (tmp_path / "06_topk_rate_cifar10.png").write_bytes(b"")
    text = "\n".join(sections(tmp_path))
    assert "## 05_certification" in text and "mean -1.0 over 1 rows" in text
    own, rest = text.split("## Figures without a table")
    assert "05_certification_cifar10.png" in own and "06_topk" not in own and "06_topk_rate_cifar10.png" in rest


def test_a_notebooks_generated_answer_opens_its_first_table_once(tmp_path):
    for stem in ("12_does_sin_help", "12_verdict"):
        pd.DataFrame({"x": [1]}).to_csv(tmp_path / f"{stem}.csv", index=False)
    (tmp_path / "12_answer.md").write_text("CIFAR-10: SIN does not add certified accuracy.\n")
    text = "\n".join(sections(tmp_path))
    assert text.count("SIN does not add") == 1
    assert text.index("## 12_does_sin_help") < text.index("SIN does not add") < text.index("## 12_verdict")


def test_every_figure_is_listed_once_under_its_notebooks_closest_table(tmp_path):
    for stem in ("02_sin_localization", "05_certification", "05_certification_large"):
        pd.DataFrame({"x": [1]}).to_csv(tmp_path / f"{stem}.csv", index=False)
    figures = [
        "02_cluster_counts_cifar-10",
        "02_sin_maps_cifar10",
        "05_certification_cifar-10",
        "05_certification_large_cifar-10",
        "11_orphan",
    ]
    for stem in figures:
        (tmp_path / f"{stem}.png").write_bytes(b"")
    text = "\n".join(sections(tmp_path))
    for stem in figures:
        assert text.count(f"({stem}.png)") == 1, stem
    parts = {p.split("\n", 1)[0]: p for p in text.split("## ")[1:]}
    assert "02_cluster_counts" in parts["02_sin_localization"] and "02_sin_maps" in parts["02_sin_localization"]
    assert "05_certification_cifar-10" in parts["05_certification"]
    assert "05_certification_large_cifar-10" in parts["05_certification_large"]
    assert "11_orphan" in parts["Figures without a table"]


def test_paper_figure_reads_the_papers_reported_numbers():
    from scalecert import experiments as E

    assert E.paper_figure("sec4_4_acc_after_patch") == 14.0
    assert E.paper_figure("fig1e_detection_rate_at_alpha_0.01") == 82.1
    with pytest.raises(KeyError, match="not in data/paper"):
        E.paper_figure("fig9_unknown")


def test_ours_vs_paper_figure_draws_one_paper_line_per_paper_row_set():
    import pandas as pd

    from scalecert import plots as P

    df = pd.DataFrame(
        {
            "patch": [1, 2, 1, 2, 1, 2],
            "ours": [60, 55, 50, 45, 40, 35],
            "defense": ["A", "A", "A (paper mode)", "A (paper mode)", "B", "B"],
            "theirs": [61, 56, 61, 56, None, None],
        }
    )
    fig = P.ours_vs_paper_figure(
        df.assign(paper=df.defense.str.replace(" (paper mode)", "")),
        "patch",
        "ours",
        "theirs",
        "defense",
        "t",
        paper_hue="paper",
    )
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert sorted(lines) == ["A (ours)", "A (paper mode) (ours)", "A (paper's)", "B (ours)"]
    assert list(lines["A (paper's)"].get_ydata()) == [61, 56]  # once, not once per mode
    assert lines["A (paper's)"].get_color() == lines["A (ours)"].get_color()
    fig = P.ours_vs_paper_figure(df, "patch", "ours", "theirs", "defense", "t", paper_name="the paper's ImageNet")
    assert "A (the paper's ImageNet)" in {line.get_label() for line in fig.axes[0].get_lines()}


def test_report_names_the_folder_it_reads(tmp_path, monkeypatch, capsys):
    """The header says which tables the report is from: figures/ itself, a paper-profile subfolder, or elsewhere."""
    from scalecert import report

    monkeypatch.setattr(report, "FIG_DIR", tmp_path / "project" / "figures")
    monkeypatch.setattr(report, "ROOT", tmp_path / "project")
    sub, outside = report.FIG_DIR / "paper" / "imagenette", tmp_path / "elsewhere"
    for folder, shown in (
        (report.FIG_DIR, "`figures/`"),
        (sub, "`figures/paper/imagenette/`"),
        (outside, f"`{outside}`"),
    ):
        folder.mkdir(parents=True)
        report.main(["--profile", "paper", "--fig-dir", str(folder)])
        assert shown in capsys.readouterr().out.splitlines()[2]


def test_wall_time_measurements_go_to_the_measurement_folder_not_to_the_figures(tmp_path, monkeypatch):
    from scalecert import plots as P

    monkeypatch.setattr(P, "FIG_DIR", tmp_path / "figures")
    path = P.save_measurement(pd.DataFrame({"seconds_per_image": [1.5]}), "00_cost", tmp_path / "m")
    assert path == tmp_path / "m" / "00_cost.csv" and not (tmp_path / "figures").exists()
    got = pd.read_csv(path)
    assert list(got.columns) == ["seconds_per_image", "measured_utc", "cpus"] and got.seconds_per_image[0] == 1.5
    assert (tmp_path / "m" / "00_cost.md").read_text().startswith("|")
