"""Random access to the samples behind feature rows: row i of a split's features is the i-th sample of its shards
in manifest order (the evaluation loader reads them so); bytes are read at the shard table's offsets.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from dali_pipes.shard_table import ShardTable
from ingest.schema import ShardFormatError, load_manifest


class SplitSamples:
    """The samples of one split of a shard folder, addressable by feature row."""

    def __init__(self, shard_root: str | Path, split: str):
        self.root, self.split = Path(shard_root), split
        manifest = load_manifest(self.root)
        self.label_names = manifest.label_names
        self.table = ShardTable.load(manifest.shards(split))

    def __len__(self) -> int:
        return len(self.table)

    def key(self, i: int) -> str:
        """The sample's __key__ (its tar members are named ``key.ext``)."""
        return self.table.samples[i].key

    def meta(self, i: int) -> dict:
        return json.loads(self.table.read(i, "json"))

    def pid(self, i: int) -> int:
        return int.from_bytes(self.table.read(i, "pid"), "little", signed=True)

    def image(self, i: int) -> np.ndarray:
        """(H, W) uint8 grayscale of the stored JPEG."""
        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(self.table.read(i, "jpg"))).convert("L"))

    def check_rows(self, pids: np.ndarray, *, sample_every: int = 1) -> None:
        """Fail (one line) when feature rows and samples disagree: a feature cache of other shards, or a loader
        whose order is not the manifest's."""
        if len(pids) != len(self):
            raise ShardFormatError(f"{self.root}/{self.split}: {len(pids)} feature rows for {len(self)} samples")
        for i in range(0, len(self), sample_every):
            if self.pid(i) != int(pids[i]):
                raise ShardFormatError(f"{self.root}/{self.split}: feature row {i} is not sample {i} "
                                       f"(patient ids differ)")
