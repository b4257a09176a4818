"""True dependency floors: every version-gated API the code uses has its floor in pyproject.toml (a table here keeps
the two in step and checks the API is really used and present), and no command prints a warning on --help."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Floor:
    requirement: str  # distribution name in pyproject ("python" = requires-python)
    minimum: str      # the lowest version that has the API
    api: str          # what needs it
    used_in: str      # file that uses it
    marker: str       # text in that file that shows the use
    why: str


FLOORS = [
    Floor("python", "3.11", "tomllib", "trainer/config.py", "import tomllib", "tomllib is in the stdlib from 3.11"),
    Floor("pydicom", "3.0", "pydicom.pixels", "ingest/dicom.py", "from pydicom.pixels import",
          "the pixels module (apply_modality_lut, apply_voi_lut) replaced pydicom.pixel_data_handlers in 3.0"),
    Floor("nvidia-dali-cuda120", "1.44", "Pipeline(exec_dynamic=True)", "dali_pipes/pipelines.py", "exec_dynamic=True",
          "the dynamic executor stopped being experimental (GPU->CPU transfers, zero-copy outputs) in 1.44"),
    Floor("triton", "3.4", "triton.knobs", "trainer/fused_ntxent_kernels.py", "triton.knobs.runtime.interpret",
          "triton.knobs replaced the environment lookups in 3.4"),
    Floor("torch", "2.11", "oldest verified torch", "scripts/gpu_check.py", "def floors()",
          "the trainer, loss and kernel tests ran on torch 2.11 / Triton 3.6 / torchvision 0.26 (a lent GPU machine's "
          "set, which gpu_check compares with these floors); no API the code uses is newer; torch >= 2.8 pairs with "
          "triton >= 3.4"),
    Floor("torchvision", "0.26", "torchvision paired with torch 2.11", "trainer/models.py", "torchvision",
          "each torchvision release is built for one torch release; 0.26 is torch 2.11's"),
    Floor("nvidia-ml-py", "12.535", "pynvml (NVML bindings)", "trainer/metrics.py", "import pynvml",
          "the maintained distribution of the pynvml module; str (not bytes) results"),
]


def _pyproject_floors() -> dict[str, str]:
    floors = {"python": re.fullmatch(r">=\s*([\d.]+)", PYPROJECT["project"]["requires-python"]).group(1)}
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([\d.]+)", dep)
        assert m, f"pyproject dependency without a >= floor: {dep!r}"
        floors[m.group(1).lower()] = m.group(2)
    return floors


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("floor", FLOORS, ids=lambda f: f.api)
def test_floor_table_matches_pyproject_and_the_code(floor):
    pins = _pyproject_floors()
    assert pins.get(floor.requirement) == floor.minimum, \
        f"pyproject has {floor.requirement}>={pins.get(floor.requirement)}, the table {floor.minimum} ({floor.why})"
    assert floor.marker in (ROOT / floor.used_in).read_text(), f"{floor.used_in} no longer uses {floor.api}"


def test_pynvml_comes_from_nvidia_ml_py_and_no_warning_filter_hides_it():
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    assert not re.search(r"(^|[\s\"'])pynvml\b", deps), "the deprecated pynvml package warns on every import"
    assert "pynvml" not in str(PYPROJECT["tool"]["pytest"]["ini_options"].get("filterwarnings", []))


def test_installed_versions_meet_the_floors_and_have_the_apis():
    """This environment satisfies the table (where the package is installed) and the APIs exist in it."""
    assert sys.version_info >= _version_tuple(FLOORS[0].minimum)
    for floor in FLOORS[1:]:
        try:
            installed = importlib.metadata.version(floor.requirement)
        except importlib.metadata.PackageNotFoundError:
            continue  # optional here (e.g. DALI on a machine without it); the import-guarded code says so
        assert _version_tuple(installed) >= _version_tuple(floor.minimum), (floor.requirement, installed)
    importlib.import_module("pydicom.pixels")
    triton = pytest.importorskip("triton")
    assert hasattr(triton, "knobs")


# ---- no warning on --help --------------------------------------------------------------------------------------

_SUBCOMMAND_HELP = """
import contextlib, io, sys
import bench.__main__ as bench, eval.__main__ as ev, ingest.cli as ingest
for name, module in (("ingest", ingest), ("eval", ev), ("bench", bench)):
    for sub in module.SUBCOMMANDS:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                module.main([sub, "--help"])
            except SystemExit as e:
                assert e.code in (0, None), (name, sub, e.code)
        assert "usage" in out.getvalue().lower(), (name, sub)
print("HELP-OK")
"""


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.parametrize("argv", [["-m", "ingest", "--help"], ["-m", "eval", "--help"], ["-m", "bench", "--help"],
                                  ["trainer/pretrain.py", "--help"]], ids=" ".join)
def test_commands_print_no_warning_on_help(argv):
    run = subprocess.run([sys.executable, *argv], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "usage" in run.stdout.lower(), run.stderr[-2000:]
    assert run.stderr == "", f"{' '.join(argv)} printed on stderr:\n{run.stderr[-2000:]}"


def test_every_subcommand_help_prints_no_warning():
    run = subprocess.run([sys.executable, "-c", _SUBCOMMAND_HELP], cwd=ROOT, env=_clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "HELP-OK" in run.stdout, run.stderr[-3000:]
    assert run.stderr == "", run.stderr[-3000:]
