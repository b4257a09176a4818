"""The pre-encoded shard writer used by build-shards must produce exactly the bytes of `write_shard` (whose
tar and DALI index match tarfile and DALI's wds2idx), for awkward sizes and key lengths."""
from __future__ import annotations

import random
import tarfile

from ingest.shards import (_tarinfo, encode_sample, read_index, tar_archive_bytes, tar_member_bytes,
                           ustar_header, write_encoded_shard, write_shard)


def _samples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"__key__": f"ds-p{i:05d}-s1-v" + "x" * rng.randint(0, 70),
             "jpg": rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randint(1, 5000)])),
             "json": rng.randbytes(rng.randint(1, 700)), "lbl": rng.randbytes(rng.choice([0, 4, 56])),
             "pid": rng.randbytes(8)} for i in range(n)]


def test_ustar_header_matches_tarfile():
    for name, size in [("a.jpg", 0), ("k" * 95 + ".lbl", 8), ("x-y_z.json", 8**11 - 1), ("p.pid", 12345)]:
        assert ustar_header(name, size) == _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_encoded_shard_is_byte_identical_to_write_shard(tmp_path):
    samples = _samples(40)
    for n in (0, 1, 3, 40):
        a = write_shard(tmp_path / "a.tar", samples[:n])
        b = write_encoded_shard(tmp_path / "b.tar", [encode_sample(s) for s in samples[:n]])
        assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
        assert (tmp_path / "a.idx").read_text() == (tmp_path / "b.idx").read_text()
        assert (a.sha256, a.num_bytes, a.num_samples, a.keys) == (b.sha256, b.num_bytes, b.num_samples, b.keys)
        members = sum(tar_member_bytes(len(s[e])) for s in samples[:n] for e in ("jpg", "json", "lbl", "pid"))
        assert tar_archive_bytes(members) == b.num_bytes == (tmp_path / "b.tar").stat().st_size
    entries = read_index(tmp_path / "b.idx")
    data = (tmp_path / "b.tar").read_bytes()
    for e, s in zip(entries, samples):
        for ext, (off, size) in e.items():
            assert data[off:off + size] == s[ext]
