"""The shard table: every sample of a split with the tar and the payload offset / size of each member, read once from
the DALI ``.idx`` files by ``ingest.schema.read_index`` (the one parser of the format). Every reader of shard bytes in
dali_pipes and above starts here.
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.schema import DALI_INDEX_VERSION, IndexedSample, Member, ShardFormatError, ShardInfo, read_index

PID_BYTES = 8  # a .pid member is one little-endian int64


def index_text(samples: list[IndexedSample]) -> str:
    """A ``.idx`` listing ``samples`` (the same bytes ingest writes for them)."""
    return f"{DALI_INDEX_VERSION} {len(samples)}\n" + "".join(s.index_line() + "\n" for s in samples)


def map_tar(path: Path) -> np.ndarray:
    """The whole tar as a read-only uint8 view of an mmap: a payload is then a slice (no syscall, no copy); the map
    closes when the last view of it is gone. An empty file maps to an empty array."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


@dataclass(frozen=True)
class ShardTable:
    """Every sample of one split in manifest order (row i is the i-th sample of the split's shards)."""
    shards: tuple[ShardInfo, ...]
    shard: np.ndarray                   # (N,) int32 index into shards
    samples: tuple[IndexedSample, ...]  # (N,)

    @classmethod
    def load(cls, shards: list[ShardInfo], *, need: tuple[str, ...] = ()) -> ShardTable:
        """Read the index of every shard in ``shards`` (a split's, in manifest order: ``Manifest.shards``); each
        sample must have the members ``need``."""
        shards = tuple(shards)
        rows: list[int] = []
        samples: list[IndexedSample] = []
        for si, sh in enumerate(shards):
            entries = read_index(sh.index_path, num_samples=sh.num_samples)
            for entry in entries:
                if need and any(entry.member(ext) is None for ext in need):
                    raise ShardFormatError(f"{sh.index_path}: a sample lacks {'/'.join(need)} "
                                           f"({sorted(m.ext for m in entry.members)})")
            rows += [si] * len(entries)
            samples += entries
        return cls(shards, np.asarray(rows, dtype=np.int32), tuple(samples))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def tar_paths(self) -> list[Path]:
        return [s.path for s in self.shards]

    def tar(self, i: int) -> Path:
        return self.shards[int(self.shard[i])].path

    def member(self, i: int, ext: str) -> Member:
        m = self.samples[i].member(ext)
        if m is None:
            raise ShardFormatError(f"{self.tar(i)}: sample {i} has no .{ext} component")
        return m

    def locations(self, ext: str) -> np.ndarray:
        """(N, 2) int64 (offset, size) of every sample's ``ext`` payload."""
        out = np.array([(m.offset, m.size) for m in (self.member(i, ext) for i in range(len(self)))],
                       dtype=np.int64)
        return out.reshape(-1, 2)

    def read(self, i: int, ext: str) -> bytes:
        """One payload by a positioned read (random access; no map is kept)."""
        m = self.member(i, ext)
        with open(self.tar(i), "rb") as f:
            f.seek(m.offset)
            return f.read(m.size)

    def payloads(self, ext: str) -> list[bytes]:
        """Every sample's ``ext`` payload in row order, one map per tar at a time."""
        out: list[bytes] = []
        for si, sh in enumerate(self.shards):
            rows = np.flatnonzero(self.shard == si)
            if not len(rows):
                continue
            data = map_tar(sh.path)
            for r in rows.tolist():
                m = self.member(r, ext)
                if m.offset + m.size > len(data):
                    raise ShardFormatError(f"{sh.path}: .{ext} at offset {m.offset} runs past the end of the tar")
                out.append(data[m.offset : m.offset + m.size].tobytes())
            del data
        return out

    def pids(self) -> np.ndarray:
        """(N,) int64 patient id of every sample, from its 8-byte ``.pid``."""
        for i in range(len(self)):
            m = self.member(i, "pid")
            if m.size != PID_BYTES:
                raise ShardFormatError(f"{self.tar(i)}: .pid at offset {m.offset} has {m.size} bytes, "
                                       f"expected {PID_BYTES} (int64)")
        return np.array([int.from_bytes(b, "little", signed=True) for b in self.payloads("pid")], dtype=np.int64)

    def views(self) -> list[str]:
        """The ``view`` of every sample (from its ``.json``; ``UNKNOWN`` when absent)."""
        out = []
        for i, raw in enumerate(self.payloads("json")):
            try:
                out.append(json.loads(raw).get("view", "UNKNOWN"))
            except ValueError as e:
                raise ShardFormatError(f"{self.tar(i)}: unreadable .json at offset "
                                       f"{self.member(i, 'json').offset} ({e})") from None
        return out
