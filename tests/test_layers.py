"""DESIGN.md layer order: synth -> ingest -> dali_pipes -> trainer -> eval -> {bench, serve}; a package imports
only leftwards (synth imports nothing of ours), and the two top packages never import each other; inside the tree no
two modules import each other, directly or round a circle, and no private name crosses a module boundary. The code
style's line limit holds too: no tracked *.py or *.sh line is longer than 120 characters."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["synth", "ingest", "dali_pipes", "trainer", "eval", "bench", "serve"]
SIBLINGS = {"bench": "serve", "serve": "bench"}  # both sit above eval, side by side
HEAVY = ["nvidia.dali", "triton", "pynvml", "pydicom", "tensorboard", "fastapi", "uvicorn", "starlette",
         "python_multipart"]
MAX_LINE = 120
SKIP_DIRS = {".venv", ".git", "build"}  # for the walk when there is no git checkout


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _source_files() -> list[Path]:
    """Every git-tracked *.py and *.sh file; without git (or outside a checkout), a walk of the repo instead."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "*.py", "*.sh"], cwd=ROOT, capture_output=True,
                             check=True).stdout
        tracked = sorted(ROOT / name for name in out.decode().split("\0") if name)
    except (OSError, subprocess.CalledProcessError):
        tracked = []
    if tracked:
        return tracked
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder) / n for n in names if n.endswith((".py", ".sh"))]
    return sorted(found)


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in tree.body:  # top level only: heavy imports belong inside functions
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", LAYERS)
def test_package_imports_only_leftwards(package):
    allowed = set(LAYERS[: LAYERS.index(package) + 1]) - {SIBLINGS.get(package)}
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in LAYERS and top not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "layer order violated (DESIGN.md):\n" + "\n".join(bad)


def test_dali_pipes_reads_only_ingest_schema():
    bad = []
    for path in sorted((ROOT / "dali_pipes").rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[0] == "ingest" and name not in ("ingest.schema", "ingest.files"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "dali_pipes may read only ingest.schema and ingest.files:\n" + "\n".join(bad)


def test_heavy_imports_are_lazy():
    bad = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in _module_level_imports(path):
                if any(name == h or name.startswith(h + ".") for h in HEAVY):
                    bad.append(f"{path.relative_to(ROOT)} imports {name} at module level")
    assert not bad, "heavy/optional imports must happen inside the function that needs them:\n" + "\n".join(bad)


def test_packages_import_without_heavy_deps():
    # Block the optional modules and import every package: `import trainer` must work without them.
    code = (
        "import sys\n"
        f"for m in {HEAVY!r}: sys.modules[m] = None\n"
        f"for p in {LAYERS!r}: __import__(p)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_line_over_120_characters():
    files = _source_files()
    assert files, "found no *.py / *.sh files to check"
    bad = []
    for path in files:
        if not path.is_file():  # tracked but deleted in the work tree
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if len(line) > MAX_LINE:
                bad.append(f"{path.relative_to(ROOT)}:{n}: {len(line)} characters")
    assert not bad, f"lines over {MAX_LINE} characters (wrap them):\n" + "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in the file (imports inside functions count)."""
    paths = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            paths[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for candidate in candidates:  # the longest prefix that is one of our modules
                while candidate and candidate not in paths:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name and not name.startswith(candidate + "."):
                    found.add(candidate)
        graph[name] = found
    return graph


def test_no_import_circles_between_modules():
    """A circle means a file was split and its halves still lean on each other: move the shared part down."""
    graph = _module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(" <-> ".join(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles (imports inside functions count):\n" + "\n".join(circles)


def test_no_private_name_is_imported_from_another_module():
    """`from eval.cli import _helper` is how a split file leans on its other half: shared helpers get public names
    in a module of their own."""
    ours = set(LAYERS)
    bad = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in ours):
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    if private:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(private)} "
                                   f"from {node.module}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)
