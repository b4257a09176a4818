"""View-filtered DALI indexes: one meaning of 'frontal', the subset index and its cache (reuse, staleness,
atomic writes, read-only shard folders)."""
from __future__ import annotations

import io
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_pipes import view_index as vi
from ingest.records import parse_views_option
from ingest.schema import (FORMAT_VERSION, FRONTAL_VIEWS, MANIFEST_NAME, SHARD_PATTERN, VIEWS, VIEWS_CACHE_DIR,
                           ShardFormatError, load_manifest, parse_views, read_dali_index, views_label)
from ingest.shards import write_shard


def _shards(root: Path, views: list[str], per_shard: int = 4) -> Path:
    rng = np.random.default_rng(0)
    samples = []
    for i, view in enumerate(views):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L").save(buf, format="JPEG")
        samples.append({"__key__": f"t-p{i}-v0", "jpg": buf.getvalue(), "json": json.dumps({"view": view}).encode(),
                        "lbl": struct.pack("<1f", 0.0), "pid": struct.pack("<q", i)})
    entries = []
    for k in range(0, len(samples), per_shard):
        w = write_shard(root / "train" / SHARD_PATTERN.format(index=k // per_shard), samples[k : k + per_shard])
        entries.append({"name": w.name, "num_samples": w.num_samples, "sha256": w.sha256, "num_bytes": w.num_bytes})
    (root / MANIFEST_NAME).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "datasets": ["t"], "label_names": ["x"], "num_patients": len(views),
        "rejects": [], "splits": {"train": {"num_samples": len(views), "shards": entries}}}))
    return root


VIEW_LIST = ["PA", "LAT", "UNKNOWN", "AP", "LAT", "LAT", "LAT", "LAT", "PA"]  # shard 1 (rows 4-7) is all LAT


def _selected_pids(sel: vi.ViewSelection) -> list[int]:
    out = []
    for r in sel.shards:
        data = r.tar.read_bytes()
        for entry in read_dali_index(r.index):
            off, size = entry["pid"]
            out.append(struct.unpack("<q", data[off : off + size])[0])
    return out


def test_frontal_means_drop_lateral_everywhere():
    assert FRONTAL_VIEWS == {"PA", "AP", "UNKNOWN"}
    assert parse_views("frontal") == parse_views_option("frontal") == FRONTAL_VIEWS
    assert parse_views("all") == frozenset(VIEWS) and parse_views(" pa, AP ") == {"PA", "AP"}
    names = ["all", "frontal", "AP,PA", "LAT"]
    assert [views_label(parse_views(t)) for t in names] == names
    with pytest.raises(ValueError, match="sideways"):
        parse_views("sideways")
    with pytest.raises(ValueError, match="^--views"):
        parse_views_option("")


def test_subset_index_lists_exactly_the_selected_samples(tmp_path):
    root = _shards(tmp_path / "s", VIEW_LIST)
    sel = vi.select_views(load_manifest(root), "train", FRONTAL_VIEWS)
    assert sel.num_total == 9 and sel.num_selected == 4 and sel.num_removed == 5
    assert sel.removed_by_view == {"LAT": 5}
    assert len(sel.shards) == 2  # the all-LAT tar is left out: the reader gets no empty index
    assert sorted(_selected_pids(sel)) == [0, 2, 3, 8]
    assert all(r.index.parent == root / VIEWS_CACHE_DIR / "train" for r in sel.shards)
    everything = vi.select_views(load_manifest(root), "train", frozenset(VIEWS))
    assert [r.index for r in everything.shards] == [s.index_path for s in load_manifest(root).shards("train")]


def test_cache_is_reused_and_a_changed_tar_is_rederived(tmp_path, monkeypatch):
    root = _shards(tmp_path / "s", VIEW_LIST)
    first = vi.select_views(load_manifest(root), "train", FRONTAL_VIEWS)
    with monkeypatch.context() as m:  # served from the cache: no tar is scanned again
        m.setattr(vi.ShardTable, "load", classmethod(lambda cls, shards, **kw: pytest.fail(f"rescanned {shards}")))
        again = vi.select_views(load_manifest(root), "train", FRONTAL_VIEWS)
    assert again == vi.ViewSelection(first.shards, 4, 9, {})
    tar = first.shards[0].tar
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place, same size
    fresh = vi.select_views(load_manifest(root), "train", FRONTAL_VIEWS)
    assert fresh.shards[0].index != first.shards[0].index and fresh.shards[1].index == first.shards[1].index
    other = vi.select_views(load_manifest(root), "train", frozenset({"PA"}))  # another selection, another file
    assert other.num_selected == 2 and {r.index for r in other.shards}.isdisjoint(r.index for r in fresh.shards)
    with open(tar, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardFormatError, match="changed after ingest"):
        vi.select_views(load_manifest(root), "train", FRONTAL_VIEWS)


def test_concurrent_ranks_write_one_complete_index(tmp_path):
    root = _shards(tmp_path / "s", VIEW_LIST * 8, per_shard=72)
    manifest = load_manifest(root)
    results, errors = [], []

    def derive():
        try:
            results.append(vi.select_views(manifest, "train", FRONTAL_VIEWS))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=derive) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({r.shards[0].index for r in results}) == 1
    cache = root / VIEWS_CACHE_DIR / "train"
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []
    assert len(read_dali_index(results[0].shards[0].index)) == 32


def test_read_only_shard_folder_uses_the_user_cache(tmp_path, monkeypatch):
    root = _shards(tmp_path / "s", VIEW_LIST)
    (root / VIEWS_CACHE_DIR).write_text("not a folder")  # cannot hold the cache (like a read-only mount)
    monkeypatch.setenv(vi.USER_CACHE_ENV, str(tmp_path / "user"))
    sel = vi.select_views(load_manifest(root), "train", FRONTAL_VIEWS)
    assert all(r.index.parent == tmp_path / "user" / "views-index" for r in sel.shards)
    assert sorted(_selected_pids(sel)) == [0, 2, 3, 8]
    for r in sel.shards:
        r.index.unlink()
    monkeypatch.setenv(vi.USER_CACHE_ENV, str(sel.shards[0].tar))  # a file: no folder can be made under it
    with pytest.raises(ShardFormatError, match=f"cannot write its view-filtered index.*{vi.USER_CACHE_ENV}"):
        vi.select_views(load_manifest(root), "train", FRONTAL_VIEWS)


def test_flagship_presets_keep_folder_and_dicom_images():
    """Folder archives and DICOM without ViewPosition ingest as UNKNOWN: every preset's selection keeps them."""
    from trainer.config import load_config
    presets = sorted((Path(__file__).resolve().parents[1] / "trainer" / "configs").glob("*.toml"))
    assert presets
    for preset in presets:
        views = parse_views(load_config(preset, ["data.shards=/nowhere"]).data.views)
        assert {"UNKNOWN", "PA", "AP"} <= views, preset.name
    from trainer.config import ConfigError
    with pytest.raises(ConfigError, match=r"^data\.views 'sideways': use all \| frontal"):
        load_config(None, ["data.shards=/nowhere", "data.views=sideways"])


def test_cache_folder_is_invisible_to_verify_and_cleared_by_overwrite(tmp_path):
    from ingest.build import prepare_out
    from ingest.verify import verify

    root = _shards(tmp_path / "s", VIEW_LIST)
    before, _ = verify(root)
    vi.select_views(load_manifest(root), "train", FRONTAL_VIEWS)
    assert (root / VIEWS_CACHE_DIR / "train").is_dir()
    assert verify(root)[0] == before  # no "not listed in the manifest" for the cache
    prepare_out(root, overwrite=True)  # an ingest-owned entry, not a foreign one
    assert not (root / VIEWS_CACHE_DIR).exists()


@pytest.mark.parametrize(("method", "path"), [("simclr", "webdataset reader"), ("moco", "webdataset reader"),
                                              ("micle", "MICLe pairs")])
def test_start_up_line_names_the_data_path(tmp_path, capsys, method, path):
    import torch

    from trainer.augment_section import augment_config
    from trainer.config import load_config
    from trainer.data import build_loader

    root = _shards(tmp_path / "s", VIEW_LIST)
    cfg = load_config(None, [f"data.shards={root}", "data.views=frontal", f"loss.method={method}", "data.batch_size=2",
                             "loss.moco_queue=4", "data.image_size=16", "data.num_threads=1"])
    loader = build_loader(cfg.data, cfg.model, cfg.loss, augment=augment_config(cfg.augment), per_rank_batch=2,
                          rank=0, world_size=1, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    assert capsys.readouterr().out.startswith(f"data path: {path} | views=frontal: 4 of 9 images in train")
    assert loader.data_path == path and len(loader) == 2
