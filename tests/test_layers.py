"""DESIGN.md layer order: ingest -> dali_pipes -> trainer -> eval -> {bench, serve}; a package imports only leftwards,
and the two top packages never import each other."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["ingest", "dali_pipes", "trainer", "eval", "bench", "serve"]
SIBLINGS = {"bench": "serve", "serve": "bench"}  # both sit above eval, side by side
HEAVY = ["nvidia.dali", "triton", "pynvml", "pydicom", "tensorboard", "fastapi", "uvicorn", "starlette",
         "python_multipart"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


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
            if name.split(".")[0] == "ingest" and name != "ingest.schema":
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "dali_pipes may read only ingest.schema:\n" + "\n".join(bad)


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
