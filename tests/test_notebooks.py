"""Every notebook has a tiny-profile reference copy checked by nbval, and bad parameters fail fast."""

import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def code_cells(nb):
    return [
        c.source for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])
    ]


def test_there_are_notebooks():
    assert SOURCES


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_every_notebook_is_covered_by_an_up_to_date_reference(src):
    ref = ROOT / "tests" / "notebooks" / src.name
    assert ref.is_file(), f"{src.name} has no nbval reference: run `make golden`"
    a, b = nbformat.read(src, 4), nbformat.read(ref, 4)
    assert code_cells(a) == code_cells(b), f"{ref} is stale: run `make golden`"
    assert any("NBVAL_CHECK_OUTPUT" in c for c in code_cells(a)), f"{src.name} checks no key number"
    tags = [c.metadata.get("tags", []) for c in a.cells]
    assert any("parameters" in t for t in tags), f"{src.name} has no papermill parameters cell"


BAD_PARAMETERS = [
    ("00_data", {"datasets": "mnist"}, "unknown dataset"),
    ("00_data", {"profile": "huge"}, "unknown profile"),
    ("02_sin_localization", {"patch_pct": "150"}, "not smaller than the 32x32 images"),
    ("09_empirical_recovery", {"patch_pct": "100", "datasets": "imagenette"}, "not smaller than the 224x224"),
    ("04_adaptive_attack", {"patch_pct": "-2"}, "patch_pct must be a positive number"),
    ("04_adaptive_attack", {"alphas": "[0, -1]"}, "alphas must be a list of numbers >= 0"),
    ("05_certification", {"large_n_per_class": "0"}, "large_n_per_class must be a whole number >= 1"),
    ("05_certification", {"peer_n_per_class": "2.5"}, "peer_n_per_class must be a whole number >= 1"),
    ("11_window_family", {"rs": "[1, 0]"}, "rs must be a list of whole numbers >= 1"),
    ("07_window_merging", {"taus": "[0.3, 7]"}, "taus must be a list of numbers in (0, 1]"),
]


def run_until_error(notebook, params, cells=3):
    """Return (index of the code cell that raised, the exception) after running the notebook's first ``cells`` code
    cells in this process the way papermill would (its parameter parsing and injected cell), stopping at the first
    error; (None, None) if none raised. The torch RNG and pandas' options are restored afterwards."""
    import pandas as pd
    import torch
    from papermill.cli import _resolve_type
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(
        load_notebook_node(str(ROOT / "notebooks" / f"{notebook}.ipynb")),
        {k: _resolve_type(v) for k, v in params.items()},
        kernel_name="python3",
        language="python",
    )
    namespace = {"__name__": "__main__"}
    code = [c for c in nb.cells if c.cell_type == "code"][:cells]
    with torch.random.fork_rng(), pd.option_context("display.width", pd.get_option("display.width")):
        for i, cell in enumerate(code):
            assert not any(line.lstrip().startswith(("%", "!")) for line in cell.source.splitlines()), cell.source
            try:
                exec(compile(cell.source, f"<{notebook} cell {i}>", "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - the test inspects whatever the notebook raised
                return i, e
    return None, None


@pytest.mark.parametrize("notebook,params,match", BAD_PARAMETERS)
def test_bad_parameter_stops_at_the_checking_cell(notebook, params, match):
    cell, error = run_until_error(notebook, params)
    assert isinstance(error, ValueError) and match in str(error), error
    assert cell <= 2  # parameters, injected parameters, the checking cell: no work before the error


def test_a_bad_parameter_fails_the_papermill_run_at_its_first_cells(tmp_path):
    # the same check end to end once, through papermill and the scalecert engine (one kernel start)
    notebook, params, match = BAD_PARAMETERS[5]
    args = [sys.executable, "-m", "papermill", "--engine", "scalecert", "--log-level", "ERROR", "-k", "python3"]
    args += [str(ROOT / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb")]
    for k, v in params.items():
        args += ["-p", k, v]
    run = subprocess.run(
        args, capture_output=True, text=True, env={"SCALECERT_FIG_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    )
    assert run.returncode != 0
    assert match in run.stderr + run.stdout
    assert "without encryption" not in run.stderr  # the scalecert engine's kernel logs errors only
    nb = nbformat.read(tmp_path / "out.ipynb", 4)
    executed = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    assert len(executed) <= 3  # parameters, injected parameters, the checking cell


def test_per_class_takes_the_explicit_value_then_the_notebook_size_then_the_profile_default():
    from scalecert import notebook as N

    assert N.per_class("quick") == 5 and N.per_class("paper") is None
    assert N.per_class("quick", quick=3) == 3 and N.per_class("tiny", quick=3) == 1
    assert N.per_class("paper", 5, paper=10) == 5
    with pytest.raises(ValueError, match="unknown profile"):
        N.per_class("quick", fast=3)
    with pytest.raises(ValueError, match=">= 1"):
        N.per_class("quick", quick=0)
    with pytest.raises(ValueError, match=">= 1"):
        N.per_class("quick", 0)


def test_patch_steps_by_profile_and_explicit():
    from scalecert import notebook as N

    assert N.patch_steps("tiny") == 10 and N.patch_steps("quick", 7) == 7
    with pytest.raises(ValueError, match=">= 1"):
        N.patch_steps("quick", 0)


def test_alphas_by_profile_and_explicit():
    from scalecert import notebook as N

    assert N.alphas("quick") == [0.0, 0.01, 1.0] and N.alphas("paper")[-1] == 10.0
    assert N.alphas("paper", [0, 2]) == [0.0, 2.0] and N.alphas("quick", np.array([0.5])) == [0.5]
    assert N.alphas("quick", "[0, 0.5]") == [0.0, 0.5] and N.alphas("quick", 0.1) == [0.1]  # papermill -p
    for bad in ([-1.0], [float("nan")], ["1"], [True], "[0, -1]", "0.1x", "'a'", True, []):
        with pytest.raises(ValueError, match="alphas must"):
            N.alphas("quick", bad)


def test_taus_by_profile_and_explicit():
    from scalecert import notebook as N

    assert N.taus("quick") == [0.3, 0.5, 0.6] == N.taus("paper") and N.taus("tiny") == [0.3, 0.5]
    assert N.taus("tiny", [0.6]) == [0.6] and N.taus("quick", "[1, 0.4]") == [1.0, 0.4] and N.taus("quick", 1) == [1.0]
    for bad in ([0], [1.5], [-0.3], [float("nan")], ["0.5"], [True], "[0.3, 7]", []):
        with pytest.raises(ValueError, match="taus must"):
            N.taus("quick", bad)


def test_window_rs_by_profile_and_explicit():
    from scalecert import notebook as N

    assert N.window_rs("quick") == [1, 3] and N.window_rs("paper") == [1, 2, 3]
    assert N.window_rs("quick", None, N.AUDIT_RS) == [3] and N.window_rs("tiny", None, N.AUDIT_RS) == [1, 3]
    assert N.window_rs("quick", [1], N.AUDIT_RS) == [1]  # an explicit list wins over the defaults
    assert N.window_rs("quick", "[3, 1, 3]") == [1, 3] and N.window_rs("tiny", 2) == [2]
    assert N.window_rs("quick", [2.0]) == [2]
    for bad in ([0], [1.5], [float("inf")], ["1"], [True], "[1, -1]", "x", []):
        with pytest.raises(ValueError, match="rs must"):
            N.window_rs("quick", bad)


def test_check_patch_accepts_patches_smaller_than_every_image_and_names_the_offender():
    from scalecert import notebook as N

    assert N.check_patch(None, ["cifar10"]) is None
    assert N.check_patch(2, ["cifar10", "imagenette"]) == 2.0
    assert N.check_patch(99.0, "imagenette") == 99.0  # 223 px of 224
    assert N.check_patch(np.float32(2.0), "cifar10") == 2.0
    for bad in (0, -1.0, float("nan"), "5", True):
        with pytest.raises(ValueError, match="positive number"):
            N.check_patch(bad, ["cifar10"])
    with pytest.raises(ValueError, match="Imagenette-224"):
        N.check_patch(100, ["imagenette"])
    with pytest.raises(ValueError, match="CIFAR-10"):
        N.check_patch(99, ["imagenette", "cifar10"])  # 223 of 224 px, but all 32 of 32
    with pytest.raises(ValueError, match="unknown dataset"):
        N.check_patch(2, ["mnist"])


def test_by_profile_takes_the_explicit_value_else_the_profile_size():
    from scalecert import notebook as N

    assert N.by_profile("quick", None, "steps", tiny=1, quick=3, paper=10) == 3
    assert N.by_profile("paper", 7, "steps", tiny=1, quick=3, paper=10) == 7
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        N.by_profile("quick", 0, "steps", tiny=1, quick=3, paper=10)
    with pytest.raises(ValueError, match="one size per profile"):
        N.by_profile("quick", None, "steps", tiny=1, quick=3)
    with pytest.raises(ValueError, match="one size per profile"):
        N.by_profile("quick", None, "steps", tiny=1, quik=3, paper=10)
    for bad in (2.7, True, "3", float("inf"), 0):
        with pytest.raises(ValueError, match="whole number >= 1"):
            N.by_profile("quick", bad, "steps", tiny=1, quick=3, paper=10)
    assert N.by_profile("quick", np.int64(4), "steps", tiny=1, quick=3, paper=10) == 4
    assert N.by_profile("quick", 5.0, "steps", tiny=1, quick=3, paper=10) == 5
    with pytest.raises(ValueError, match="unknown profile"):
        N.by_profile("huge", None, "steps", tiny=1, quick=3, paper=10)


def test_flag_parameters_take_0_or_1_or_the_profiles_default():
    from scalecert import notebook as N

    kw = dict(tiny=True, quick=True, paper=False)
    assert N.flag("paper", None, "compute", **kw) is False and N.flag("quick", None, "compute", **kw) is True
    assert N.flag("paper", 1, "compute", **kw) is True and N.flag("tiny", False, "compute", **kw) is False
    for bad in (2, 0.0, "1", -1):
        with pytest.raises(ValueError, match="compute must be 0 or 1"):
            N.flag("quick", bad, "compute", **kw)


def test_the_tiny_profile_runs_patchcleanser_on_the_vanilla_model_only():
    from scalecert import experiments as E
    from scalecert import notebook as N

    for name in ("cifar10", "imagenette"):
        both = E.patchcleanser_runs(name)
        assert N.patchcleanser_models("tiny", name) == both[:1] == [(E.PC_VANILLA, E.model_name(name))]
        assert N.patchcleanser_models("quick", name) == N.patchcleanser_models("paper", name) == both


def test_two_notebooks_run_side_by_side_with_the_scalecert_engine(tmp_path):
    # make figures runs two notebooks at once: their kernels must not read each other's messages (seen with IPC
    # transport, which gave both kernels one socket path), and neither may print the kernel's TCP warning. A small
    # notebook whose cells overlap in time stands in for two real ones (each of which nbval runs anyway)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("run = -1", metadata={"tags": ["parameters"]})]
    nb.cells += [
        nbformat.v4.new_code_cell(f"import time\ntime.sleep(0.5)\nprint('run', run, 'cell', {k})") for k in range(4)
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "small.ipynb")
    runs = []
    for i in range(2):
        args = [sys.executable, "-m", "papermill", "--engine", "scalecert", "--log-level", "WARNING", "-k", "python3"]
        args += [str(tmp_path / "small.ipynb"), str(tmp_path / f"out{i}.ipynb"), "-p", "run", str(i)]
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        runs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for i, run in enumerate(runs):
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
        assert "Invalid" not in err and "without encryption" not in err, err[-2000:]
        cells = nbformat.read(tmp_path / f"out{i}.ipynb", 4).cells
        printed = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in cells if c.cell_type == "code"]
        assert [p for p in printed if p] == [f"run {i} cell {k}\n" for k in range(4)]
