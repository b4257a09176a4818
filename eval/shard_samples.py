"""Random access to the samples behind feature rows: row i of a split's features is the i-th sample of its shards
in manifest order (the evaluation loader reads them so); bytes are read at the DALI index's offsets.
"""
from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.schema import ShardFormatError, load_manifest, read_dali_index

_TAR_HEADER_BYTES = 512


@dataclass(frozen=True)
class SampleRef:
    tar: Path
    offsets: dict[str, tuple[int, int]]   # extension -> (byte offset, size) of the member's payload


class SplitSamples:
    """The samples of one split of a shard folder, addressable by feature row."""

    def __init__(self, shard_root: str | Path, split: str):
        self.root, self.split = Path(shard_root), split
        manifest = load_manifest(self.root)
        self.label_names = manifest.label_names
        self.refs: list[SampleRef] = []
        for sh in manifest.shards(split):
            entries = read_dali_index(sh.index_path)
            if len(entries) != sh.num_samples:
                raise ShardFormatError(f"{sh.index_path}: {len(entries)} samples indexed, "
                                       f"manifest lists {sh.num_samples}")
            self.refs += [SampleRef(sh.path, e) for e in entries]

    def __len__(self) -> int:
        return len(self.refs)

    def _read(self, i: int, ext: str) -> bytes:
        ref = self.refs[i]
        if ext not in ref.offsets:
            raise ShardFormatError(f"{ref.tar}: sample {i} has no .{ext} component")
        offset, size = ref.offsets[ext]
        with open(ref.tar, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def key(self, i: int) -> str:
        """The sample's __key__, from the tar header in front of its .json member."""
        ref = self.refs[i]
        with open(ref.tar, "rb") as f:
            f.seek(ref.offsets["json"][0] - _TAR_HEADER_BYTES)
            name = f.read(100).split(b"\0", 1)[0].decode()
        return name.rsplit(".", 1)[0]

    def meta(self, i: int) -> dict:
        return json.loads(self._read(i, "json"))

    def pid(self, i: int) -> int:
        return struct.unpack("<q", self._read(i, "pid"))[0]

    def image(self, i: int) -> np.ndarray:
        """(H, W) uint8 grayscale of the stored JPEG."""
        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(self._read(i, "jpg"))).convert("L"))

    def check_rows(self, pids: np.ndarray, *, sample_every: int = 1) -> None:
        """Fail (one line) when feature rows and samples disagree: a feature cache of other shards, or a loader
        whose order is not the manifest's."""
        if len(pids) != len(self):
            raise ShardFormatError(f"{self.root}/{self.split}: {len(pids)} feature rows for {len(self)} samples")
        for i in range(0, len(self), sample_every):
            if self.pid(i) != int(pids[i]):
                raise ShardFormatError(f"{self.root}/{self.split}: feature row {i} is not sample {i} "
                                       f"(patient ids differ)")


def caption_labels(meta: dict, names: list[str] | None = None, limit: int = 3) -> str:
    """Short label text for a tile: positive findings ('u:' prefix for uncertain), or 'no positive label'."""
    labels = meta.get("labels") or {}
    names = names or list(labels)
    pos = [n for n in names if labels.get(n) == 1]
    unc = [f"u:{n}" for n in names if labels.get(n) == -1]
    shown = pos + unc
    text = ", ".join(shown[:limit]) + (f" +{len(shown) - limit}" if len(shown) > limit else "")
    return text or "no positive label"
