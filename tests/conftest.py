"""Shared fixtures: the real data folder (skip when absent) and the skips of the gpu, dali and triton_interpreter
marks (no GPU, no DALI, a Triton interpreter known broken)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def _has_dali() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> tuple[int, ...]:
    import importlib.metadata
    try:
        text = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def triton_interpreter_broken() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None. Triton < 3.8 passes one-element arrays to
    int() in its interpreter, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted")."""
    triton, numpy = _version("triton"), _version("numpy")
    if triton and triton < (3, 8) and numpy >= (2, 4):
        return (f"Triton {'.'.join(map(str, triton))} interpreter with numpy {'.'.join(map(str, numpy))}: int() of a "
                "one-element array, refused by numpy >= 2.4 (fixed in Triton 3.8)")
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "dali: needs NVIDIA DALI (skipped with a reason where it is not installed)")
    config.addinivalue_line("markers", "triton_interpreter: forces TRITON_INTERPRET=1 (skipped where Triton's "
                                       "interpreter is known broken)")


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not _has_cuda():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (CI has none: run on a lent "
                                               "GPU)")
    if not _has_dali():
        skips["dali"] = pytest.mark.skip(reason="needs NVIDIA DALI (nvidia.dali is not importable here)")
    broken = triton_interpreter_broken()
    if broken:
        skips["triton_interpreter"] = pytest.mark.skip(reason=broken)
    for item in items:
        for mark, skip in skips.items():
            if mark in item.keywords:
                item.add_marker(skip)
                break


@pytest.fixture(autouse=True)
def _private_ingest_dirs(tmp_path_factory, monkeypatch):
    """The per-user pseudonym salt and private ingest logs go to a test folder, never the real home."""
    base = tmp_path_factory.getbasetemp() / "user-dirs"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(base / "state"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: real CXRs and metadata. Tests using it skip when it is absent (a clone elsewhere)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set CXR_SHARED_DATA or put ../shared beside the repo)")
    return SHARED_DATA


@pytest.fixture
def tiny_shards(tmp_path) -> Path:
    """A small shard folder (12 patients with 1-3 images, 3 labels incl. blank and -1, 64-px JPEGs, 3 splits)."""
    from shardgen import make_shards
    return make_shards(tmp_path / "shards")
