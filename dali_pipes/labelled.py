"""Fine-tuning batches: every epoch a fresh seeded permutation of the chosen patients' images (a full shuffle, not a
buffer), read by the shard table's offsets and augmented by the dali_pipes graph on the device (cpu or gpu).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dali_pipes import pipelines as P
from dali_pipes.augment import resolve_augment
from dali_pipes.shard_table import ShardTable, map_tar
from ingest.schema import ShardFormatError, load_manifest


@dataclass
class LabelledIndex:
    """Where each selected sample's ``.jpg`` / ``.lbl`` live (one split, optionally only some patients)."""
    shard_paths: list[Path]
    shard: np.ndarray        # (N,) int32 index into shard_paths
    jpg: np.ndarray          # (N, 2) int64 (offset, size) of the JPEG payload
    lbl: np.ndarray          # (N, 2) int64 (offset, size) of the raw float32 labels
    pid: np.ndarray          # (N,) int64
    num_labels: int

    def __len__(self) -> int:
        return len(self.pid)

    def raw_labels(self) -> np.ndarray:
        """(N, L) float32 raw labels of the selected samples, read by offset (no image decoding)."""
        out = np.empty((len(self), self.num_labels), dtype=np.float32)
        for s, path in enumerate(self.shard_paths):
            rows = np.flatnonzero(self.shard == s)
            if not len(rows):
                continue
            data = map_tar(path)
            for r in rows.tolist():
                off, size = self.lbl[r]
                out[r] = data[off : off + size].view("<f4")
            del data
        return out


def build_labelled_index(shard_root, split: str, patient_ids: np.ndarray | None = None) -> LabelledIndex:
    """The shard table of ``split`` and each ``.pid`` (8 bytes); keep the samples of ``patient_ids`` (all when None).
    No image is decoded: a 0.1% label fraction of a large split costs one index pass."""
    manifest = load_manifest(shard_root)
    table = ShardTable.load([s for s in manifest.shards(split) if s.num_samples > 0], need=("jpg", "lbl", "pid"))
    pid = table.pids()
    rows = np.arange(len(table)) if patient_ids is None else np.flatnonzero(
        np.isin(pid, np.asarray(patient_ids, dtype=np.int64)))
    if len(rows) == 0:
        raise ShardFormatError(f"{Path(shard_root) / split}: no training images for the selected patients")
    return LabelledIndex(table.tar_paths, table.shard[rows], table.locations("jpg")[rows], table.locations("lbl")[rows],
                         pid[rows], len(manifest.label_names))


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's sample order: a permutation drawn from (seed, epoch) alone, so any epoch is reproducible."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x46544E45]).permutation(num_samples)  # "FTNE" tag


class LabelledSource:
    """DALI external_source callable (batch mode, ``batch_info=True``) -> (jpg bytes, labels (L,) float32,
    pid (1,) int64) per sample, in ``epoch_order``; the last batch may be smaller (never dropped)."""

    def __init__(self, index: LabelledIndex, *, batch_size: int, seed: int, epoch: int):
        self.index, self.batch_size = index, batch_size
        self.order = epoch_order(len(index), seed, epoch)
        self.num_batches = math.ceil(len(index) / batch_size)
        self._maps: dict[int, np.ndarray] = {}

    def _bytes(self, s: int) -> np.ndarray:
        arr = self._maps.get(s)
        if arr is None:
            arr = self._maps[s] = map_tar(self.index.shard_paths[s])
        return arr

    def __call__(self, batch_info):
        i = batch_info.iteration
        if i >= self.num_batches:
            raise StopIteration
        rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        ix = self.index
        jpgs, lbls = [], []
        for r in rows.tolist():
            buf = self._bytes(int(ix.shard[r]))
            (jo, js), (lo, ls) = ix.jpg[r], ix.lbl[r]
            jpgs.append(buf[jo : jo + js])
            lbls.append(buf[lo : lo + ls].view("<f4"))
        return jpgs, lbls, ix.pid[rows].reshape(-1, 1)


class FinetuneLoader:
    """Iterate one epoch -> ``{"images": (B, C, H, W) channels-last, "labels": (B, L) raw, "pids": (B,)}`` on the
    device. ``set_epoch(e)`` reseeds both the order and the augmentation; the pipeline is rebuilt per epoch."""

    def __init__(self, index: LabelledIndex, *, batch_size: int, cfg, image_size: int, channels: int, device: str,
                 seed: int = 0, num_threads: int = 2):
        self.index, self.batch_size, self.image_size, self.channels = index, batch_size, image_size, channels
        self.cfg = resolve_augment(cfg, channels)
        self.device, self.seed, self.num_threads, self.epoch = device, seed, num_threads, 0
        self._dali_dtype = P.dali_output_dtype(torch.float32)
        self._device_id, self.torch_device = P.resolve_device(device, 0 if device == "gpu" else None)

    def __len__(self) -> int:
        return math.ceil(len(self.index) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        source = LabelledSource(self.index, batch_size=self.batch_size, seed=self.seed, epoch=self.epoch)
        pipe = P.build_pipeline(P.labelled_graph, batch_size=self.batch_size, num_threads=self.num_threads,
                                device_id=self._device_id, seed=P.seed_for(self.seed, self.epoch, 0x46544E45),
                                prefetch=2, source=source, cfg=self.cfg, image_size=self.image_size,
                                channels=self.channels, dali_dtype=self._dali_dtype, device=self.device)
        for _ in range(source.num_batches):
            images, labels, pids = pipe.run()
            yield {"images": P.images_to_torch(images, torch.float32, self.torch_device),
                   "labels": P.array_to_torch(labels, self.torch_device),
                   "pids": P.array_to_torch(pids, self.torch_device).reshape(-1)}

