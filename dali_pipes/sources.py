"""Random access into shards by the shard table's offsets, patient grouping, and the MICLe pair source
(a stateless callable of DALI's BatchInfo, so checkpointing restores it exactly; no tar parsing at run time).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dali_pipes.shard_table import ShardTable, map_tar
from ingest.schema import Manifest, ShardFormatError


@dataclass
class ImageTable:
    """Every sample of one split: where its JPEG lives, its patient and whether it may be used (view filter)."""
    shard_paths: list[Path]
    shard: np.ndarray        # (N,) int32 index into shard_paths
    jpg_offset: np.ndarray   # (N,) int64 byte offset of the .jpg payload in its tar
    jpg_size: np.ndarray     # (N,) int64
    pid: np.ndarray          # (N,) int64
    usable: np.ndarray       # (N,) bool

    def __len__(self) -> int:
        return len(self.pid)


def build_image_table(manifest: Manifest, split: str, *, views: frozenset[str]) -> ImageTable:
    """Read each shard's ``.pid`` and ``.json`` once (by the shard table's offsets) to group images by patient;
    an image is usable when its view is in ``views`` (``ingest.schema.parse_views``)."""
    shards = manifest.shards(split)
    if not shards:
        raise ShardFormatError(f"{manifest.root / split}: split '{split}' has no shards")
    table = ShardTable.load(shards, need=("jpg", "json", "pid"))
    jpg = table.locations("jpg")
    usable = np.array([v in views for v in table.views()], dtype=bool)
    return ImageTable(table.tar_paths, table.shard, jpg[:, 0], jpg[:, 1], table.pids(), usable)


def _epoch_rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x4D49434C, *extra])  # "MICL": stream tag


class MicleSource:
    """DALI external_source callable (batch mode, ``batch_info=True``) yielding MICLe pairs for one rank.

    Each epoch: the usable images are permuted with a seeded RNG shared by all ranks and split into ``world_size``
    equal parts (the tail that does not fill a whole global batch is dropped); every anchor gets a partner drawn
    uniformly from the *other* usable images of its patient, or itself when the patient has only one.
    Outputs per batch: jpg bytes of anchor, jpg bytes of partner, pid (B, 1) int64, multi-instance flag (B, 1) uint8.
    """

    def __init__(self, table: ImageTable, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int):
        self.table, self.batch_size = table, batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        usable = np.flatnonzero(table.usable)
        if len(usable) == 0:
            raise ShardFormatError(f"{table.shard_paths[0].parent}: no image of the selected views in this split")
        self._usable = usable
        # Patient groups: images sorted by pid, so a patient's usable images are one contiguous run.
        order = usable[np.argsort(table.pid[usable], kind="stable")]
        pids_sorted = table.pid[order]
        starts = np.flatnonzero(np.r_[True, pids_sorted[1:] != pids_sorted[:-1]])
        counts = np.diff(np.r_[starts, len(order)])
        self._group_members = order
        pos = np.full(len(table), -1, dtype=np.int64)  # image -> position in `order`
        pos[order] = np.arange(len(order))
        group_of = np.repeat(np.arange(len(starts)), counts)
        self._pos, self._starts, self._counts, self._group_of = pos, starts, counts, group_of
        self.batches_per_epoch = len(usable) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{table.shard_paths[0].parent}: {len(usable)} usable images cannot fill one batch of "
                             f"{batch_size} on each of {world_size} ranks (drop-last)")
        self._maps: dict[int, np.ndarray] = {}
        self._plan = self._make_plan()

    def _make_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(anchors, partners) for this rank and epoch, each (batches_per_epoch * batch_size,) image indices."""
        rng = _epoch_rng(self.seed, self.epoch)
        per_rank = self.batches_per_epoch * self.batch_size
        anchors_all = rng.permutation(self._usable)[: per_rank * self.world_size]
        # Partner draw for every anchor on every rank from the same stream, so ranks never depend on each other.
        g = self._group_of[self._pos[anchors_all]]
        start, count = self._starts[g], self._counts[g]
        self_off = self._pos[anchors_all] - start
        r = rng.integers(0, np.maximum(count - 1, 1))
        off = np.where(count > 1, r + (r >= self_off), self_off)  # uniform over the others, never itself
        partners_all = self._group_members[start + off]
        sl = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return anchors_all[sl], partners_all[sl]

    def multi_instance_fraction(self) -> float:
        anchors, partners = self._plan
        return float(np.mean(anchors != partners)) if len(anchors) else 0.0

    def _shard_bytes(self, s: int) -> np.ndarray:
        """The whole tar mapped once (``map_tar``): a JPEG is a slice, which external_source copies once into
        DALI's buffer."""
        arr = self._maps.get(s)
        if arr is None:
            arr = self._maps[s] = map_tar(self.table.shard_paths[s])
        return arr

    def _jpegs(self, images: np.ndarray) -> list[np.ndarray]:
        shard, off, size = self.table.shard[images], self.table.jpg_offset[images], self.table.jpg_size[images]
        return [self._shard_bytes(s)[o : o + n] for s, o, n in zip(shard.tolist(), off.tolist(), size.tolist())]

    def __call__(self, batch_info):
        i = batch_info.iteration
        if i >= self.batches_per_epoch:
            raise StopIteration
        anchors, partners = self._plan
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        a, p = anchors[sl], partners[sl]
        return (self._jpegs(a), self._jpegs(p), self.table.pid[a].reshape(-1, 1),
                (a != p).astype(np.uint8).reshape(-1, 1))  # (B, 1) int64, (B, 1) uint8

    def close(self) -> None:
        self._maps.clear()  # the mmaps close when the last view (possibly held by DALI) is gone

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
