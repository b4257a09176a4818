"""View-filtered DALI indexes: a subset ``.idx`` over the unchanged tar, so the webdataset reader serves exactly the
selected views. Derived once per (tar content, selection) into a cache beside the shards, written atomically and
keyed by the tar's manifest sha256, size and mtime, so a changed tar is never read through a stale index.
The cache lives in ``OUT/views-cache/SPLIT/``, outside the split folders that ``ingest verify`` checks.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from dali_pipes.shard_table import ShardTable, index_text
from ingest.files import atomic_write_text
from ingest.schema import DALI_INDEX_VERSION, VIEWS, VIEWS_CACHE_DIR, Manifest, ShardFormatError, ShardInfo, views_label

USER_CACHE_ENV = "CXR_SSL_CACHE"  # where filtered indexes go when the shard folder is read-only


@dataclass(frozen=True)
class ReaderShard:
    """One tar as the reader sees it: the index it reads and how many samples that index lists."""
    tar: Path
    index: Path
    num_samples: int


@dataclass(frozen=True)
class ViewSelection:
    shards: list[ReaderShard]   # only tars with at least one selected sample
    num_selected: int
    num_total: int
    removed_by_view: dict[str, int]  # filled when an index was derived in this call; empty when all came from cache

    @property
    def num_removed(self) -> int:
        return self.num_total - self.num_selected


def _cache_key(shard: ShardInfo, label: str) -> str:
    st = shard.path.stat()
    if st.st_size != shard.num_bytes:
        raise ShardFormatError(f"{shard.path}: {st.st_size} bytes, the manifest says {shard.num_bytes}: the shard "
                               f"changed after ingest (run `ingest verify`)")
    text = f"{shard.sha256}|{st.st_size}|{st.st_mtime_ns}|{label}|{DALI_INDEX_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_dirs(shard: ShardInfo) -> list[Path]:
    user = Path(os.environ.get(USER_CACHE_ENV) or Path.home() / ".cache" / "cxr-ssl") / "views-index"
    split_dir = shard.path.parent
    return [split_dir.parent / VIEWS_CACHE_DIR / split_dir.name, user]


def _indexed_count(path: Path) -> int | None:
    try:
        with open(path) as f:
            version, count = f.readline().split()
        return int(count) if version == DALI_INDEX_VERSION else None
    except (OSError, ValueError):
        return None


def _filtered_index(shard: ShardInfo, views: frozenset[str], label: str, removed: dict[str, int]) -> ReaderShard:
    name = f"{shard.path.stem}-{_cache_key(shard, label)}.idx"
    for folder in _cache_dirs(shard):
        count = _indexed_count(folder / name)
        if count is not None:
            return ReaderShard(shard.path, folder / name, count)
    table = ShardTable.load([shard], need=("json",))
    keep = []
    for sample, view in zip(table.samples, table.views()):
        if view in views:
            keep.append(sample)
        else:
            removed[view] = removed.get(view, 0) + 1
    text = index_text(keep)
    errors = []
    for folder in _cache_dirs(shard):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Each writer has its own temp file: concurrent ranks each rename a complete file.
            return ReaderShard(shard.path, atomic_write_text(folder / name, text), len(keep))
        except OSError as e:
            errors.append(f"{folder}: {e.strerror or e}")
    raise ShardFormatError(f"{shard.path}: cannot write its view-filtered index ({'; '.join(errors)}); set "
                           f"{USER_CACHE_ENV} to a writable folder")


def select_views(manifest: Manifest, split: str, views: frozenset[str]) -> ViewSelection:
    """The reader's tars and indexes for ``views``: the ingest indexes for every view, else cached subset indexes."""
    shards = [s for s in manifest.shards(split) if s.num_samples > 0]
    total = sum(s.num_samples for s in shards)
    if views >= frozenset(VIEWS):
        return ViewSelection([ReaderShard(s.path, s.index_path, s.num_samples) for s in shards], total, total, {})
    label = views_label(views)
    removed: dict[str, int] = {}
    out = [_filtered_index(s, views, label, removed) for s in shards]
    kept = [r for r in out if r.num_samples > 0]  # DALI's reader wants no empty index
    return ViewSelection(kept, sum(r.num_samples for r in kept), total, removed)
