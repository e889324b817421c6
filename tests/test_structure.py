"""The package's import graph has no circle.

Every ``import``/``from ... import`` inside ``scalecert/`` counts, at module level or deferred inside a
function: a deferred import still makes one module depend on the other, it only hides the circle from the
interpreter until that function runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "scalecert"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Return {dotted module name: file} of every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """Return the longest prefix of the dotted name that is a module of the package, or None."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Return the package modules that ``module`` imports anywhere in its file (functions included).

    ``from .x import y`` names ``x``, or ``x.y`` when that is a submodule; ``from . import y`` names
    the submodule ``y``, or the package itself when ``y`` is one of its attributes."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            names = []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases = [base]
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in bases:
            if name.split(".")[0] != PACKAGE:
                continue
            subs = [n for n in names if n in modules]
            if subs:
                targets.update(subs)
            if not subs or len(subs) < len(names):
                hit = _resolve(name, modules)
                if hit is not None:
                    targets.add(hit)
    targets.discard(module)
    return targets


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Return {module: the package modules it imports}."""
    modules = module_files(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def _shortest_circle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str] | None:
    """Return a shortest circle start -> ... -> start inside members (breadth first), or None."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            if start in graph[v]:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            for w in sorted(graph[v] & members):
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the import circles: a shortest one through every module that lies on one, each circle once
    (rotated to start at its first module in sorted order)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components; a few dozen modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:
        for start in sorted(comp):
            ring = _shortest_circle(graph, start, comp)[:-1]
            k = ring.index(min(ring))
            ring = ring[k:] + ring[:k] + [ring[k]]
            if ring not in out:
                out.append(ring)
    return sorted(out, key=lambda c: (len(c), c))


def test_graph_sees_relative_absolute_and_deferred_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("import scalecert.sub.c\nfrom scalecert import a\n")
    (pkg / "sub" / "__init__.py").write_text("X = 1\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom . import X\nfrom ..sub import c\n")
    graph = import_graph(pkg)
    assert graph == {
        "scalecert": {"scalecert.a"},
        "scalecert.a": {"scalecert.b"},
        "scalecert.b": {"scalecert.a", "scalecert.sub.c"},
        "scalecert.sub": set(),
        "scalecert.sub.c": {"scalecert.a", "scalecert.sub"},
    }
    assert circles(graph) == [
        ["scalecert.a", "scalecert.b", "scalecert.a"],
        ["scalecert.a", "scalecert.b", "scalecert.sub.c", "scalecert.a"],
    ]
    assert circles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles in scalecert/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_paths_come_from_paths_module():
    """Only scalecert/paths.py locates the repository from ``__file__``; every other module imports its folders."""
    users = [
        m
        for m, p in module_files().items()
        if m != f"{PACKAGE}.paths"
        and any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(ast.parse(p.read_text())))
    ]
    assert not users, f"modules that rebuild paths from __file__ instead of importing scalecert.paths: {users}"


def test_paths_honour_the_environment(tmp_path):
    import subprocess
    import sys

    env = {
        "SCALECERT_CACHE_DIR": str(tmp_path / "c"),
        "SCALECERT_FIG_DIR": str(tmp_path / "f"),
        "SCALECERT_DATA_DIR": str(tmp_path / "d"),
        "PATH": "/usr/bin:/bin",
    }
    code = (
        "import importlib.util as u\n"  # paths.py alone: the package's __init__ would load torch
        f"s = u.spec_from_file_location('paths', {str(ROOT / 'paths.py')!r}); P = u.module_from_spec(s)\n"
        "s.loader.exec_module(P); print(P.CACHE_DIR, P.FIG_DIR, P.DATA_DIR, P.ROOT, sep='\\n')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT.parent
    ).stdout.split("\n")
    assert out[:4] == [str(tmp_path / "c"), str(tmp_path / "f"), str(tmp_path / "d"), str(ROOT.parent)]


def test_relative_names_a_path_inside_the_repository_from_its_root(tmp_path):
    from scalecert.paths import ROOT as REPO
    from scalecert.paths import relative

    assert relative(REPO / "data" / "runs" / "m" / "log.jsonl") == "data/runs/m/log.jsonl"
    assert relative(tmp_path / "log.jsonl") == str(tmp_path / "log.jsonl")
    assert relative(tmp_path / "a" / "log.jsonl", tmp_path) == "a/log.jsonl"


def test_every_package_name_a_notebook_uses_exists():
    """The notebooks reach the package through aliases (``from scalecert import experiments as E``): every
    ``E.name`` they use must exist, so that moving a function between modules cannot break a notebook unseen."""
    import importlib
    import re

    import nbformat

    missing, checked = [], 0
    notebooks = sorted((ROOT.parent / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 13
    for path in notebooks:
        code = "\n".join(c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code")
        aliases = {}
        for line in re.findall(r"^\s*from scalecert(?:\.(\w+))? import (.+)$", code, flags=re.M):
            pkg, names = line
            for part in names.split(","):
                m = re.fullmatch(r"\s*(\w+)(?:\s+as\s+(\w+))?\s*", part.split("#")[0])
                if m:
                    mod = f"scalecert.{pkg + '.' if pkg else ''}{m.group(1)}"
                    try:
                        aliases[m.group(2) or m.group(1)] = importlib.import_module(mod)
                    except ImportError:
                        pass  # a function or constant imported by name, not a module
        for alias, mod in aliases.items():
            for name in set(re.findall(rf"(?<![\w.]){alias}\.([A-Za-z_]\w*)", code)):
                checked += 1
                if not hasattr(mod, name):
                    missing.append(f"{path.name}: {alias}.{name} ({mod.__name__})")
    assert checked > 100 and not missing, missing
