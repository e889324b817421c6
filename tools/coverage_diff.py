"""Line coverage of scalecert/ by `make test`, measured by tools/test_coverage.sh.

python tools/coverage_diff.py summarise DATA_FILE OUT.json   the executed statements of a combined measurement
python tools/coverage_diff.py report DIR                      statement coverage of pytest, nbval and both
python tools/coverage_diff.py diff OLD_DIR NEW_DIR            statements OLD executed and NEW no longer does
                                                              (exit 1 if pytest and nbval together lost one)
"""

import glob
import json
import sys
from collections import Counter
from pathlib import Path

import coverage

PARTS = ("pytest", "nbval")
ROOT = Path(__file__).resolve().parents[1]


def statements() -> dict[str, set[int]]:
    """Return the executable statement lines of every module of scalecert/, by path relative to the project."""
    cov = coverage.Coverage(data_file=None, config_file=False)
    files = sorted(glob.glob("scalecert/**/*.py", root_dir=ROOT, recursive=True))
    return {f: set(cov.analysis2(str(ROOT / f))[1]) for f in files}


def summarise(data_file: str, out: str) -> None:
    """Write the executed statements of a combined measurement as {file: {line: source text}}."""
    data = coverage.CoverageData(basename=data_file)
    data.read()
    root = str(ROOT) + "/"
    executed = {f.replace(root, ""): set(data.lines(f) or []) for f in data.measured_files()}
    lines = {}
    for file, stmts in statements().items():
        text = (ROOT / file).read_text().splitlines()
        lines[file] = {n: text[n - 1].strip() for n in sorted(executed.get(file, set()) & stmts)}
    Path(out).write_text(json.dumps(lines, indent=0))
    print(f"{out}: {sum(map(len, lines.values()))} statements executed")


def executed(directory: Path, parts: tuple[str, ...]) -> dict[tuple[str, str], str]:
    """Return the executed statements of the named parts of a measurement: {(file, line number): source text}."""
    seen = {}
    for part in parts:
        for file, numbered in json.loads((directory / f"{part}.json").read_text()).items():
            seen.update({(file, n): text for n, text in numbered.items()})
    return seen


def report(directory: str) -> None:
    """Print the statement coverage of each part and of both together."""
    total = sum(map(len, statements().values()))
    for label, parts in [("pytest", ("pytest",)), ("nbval", ("nbval",)), ("pytest + nbval", PARTS)]:
        n = len(executed(Path(directory), parts))
        print(f"{label}: {n} of {total} statements ({100 * n / total:.1f}%)")


def diff(old: str, new: str) -> int:
    """Print the statements OLD executed that NEW does not (by file and source text, so that an edit above a line
    does not count as losing it); return 1 if pytest and nbval together lost one."""
    lost = 0
    for label, parts in [("pytest + nbval", PARTS), ("nbval alone", ("nbval",))]:
        before = Counter((f, t) for (f, _), t in executed(Path(old), parts).items())
        after = Counter((f, t) for (f, _), t in executed(Path(new), parts).items())
        gone = sorted((before - after).elements())
        print(f"{label}: {before.total()} statements before, {after.total()} after, {len(gone)} no longer executed")
        for file, text in gone[:40]:
            print(f"  {file}: {text}")
        lost = lost or (len(gone) if parts == PARTS else 0)
    return 1 if lost else 0


if __name__ == "__main__":
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "summarise" and len(args) == 2:
        summarise(*args)
    elif command == "report" and len(args) == 1:
        report(*args)
    elif command == "diff" and len(args) == 2:
        sys.exit(diff(*args))
    else:
        sys.exit(__doc__)
