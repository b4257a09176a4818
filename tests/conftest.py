"""Shared fixtures: the real data folder (skip when absent) and the GPU marker's skip."""
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


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (CI has none: run on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
