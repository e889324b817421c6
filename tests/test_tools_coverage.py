import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("coverage_diff", ROOT / "tools" / "coverage_diff.py")
coverage_diff = importlib.util.module_from_spec(spec)
spec.loader.exec_module(coverage_diff)


def _measure(directory: Path, pytest: dict, nbval: dict) -> Path:
    directory.mkdir()
    (directory / "pytest.json").write_text(json.dumps(pytest))
    (directory / "nbval.json").write_text(json.dumps(nbval))
    return directory


def test_a_statement_moved_by_an_edit_is_not_lost_and_a_dropped_one_is(tmp_path, capsys):
    old = _measure(tmp_path / "old", {"a.py": {"3": "x = 1"}}, {"a.py": {"5": "plot()"}, "b.py": {"1": "y()"}})
    # line 3 moved to 4 (an edit above it): still executed; b.py's y() no longer runs anywhere
    new = _measure(tmp_path / "new", {"a.py": {"4": "x = 1"}}, {"a.py": {"6": "plot()"}})
    assert coverage_diff.diff(str(old), str(new)) == 1
    out = capsys.readouterr().out
    assert "pytest + nbval: 3 statements before, 2 after, 1 no longer executed" in out
    assert "  b.py: y()" in out


def test_a_statement_nbval_drops_but_pytest_runs_is_not_lost_from_the_union(tmp_path, capsys):
    old = _measure(tmp_path / "old", {"a.py": {"3": "x = 1"}}, {"a.py": {"3": "x = 1", "5": "plot()"}})
    new = _measure(tmp_path / "new", {"a.py": {"3": "x = 1"}}, {"a.py": {"5": "plot()"}})
    assert coverage_diff.diff(str(old), str(new)) == 0
    assert "nbval alone: 2 statements before, 1 after, 1 no longer executed" in capsys.readouterr().out


def test_statements_are_those_of_the_package():
    stmts = coverage_diff.statements()
    assert "scalecert/defense.py" in stmts and all(f.startswith("scalecert/") for f in stmts)
    assert 1 not in stmts["scalecert/defense.py"]  # the module docstring's first line is not a statement
