"""dali_pipes.shard_table: every member's offset and size agree with what tarfile reports, the re-written index is
the bytes ingest wrote, and a bad index or a missing member fails with one line naming the file."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from dali_pipes.shard_table import ShardTable, index_text, read_index
from ingest.schema import ShardFormatError, load_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shardgen import make_shards
    return make_shards(tmp_path_factory.mktemp("st") / "shards", num_patients=14, size_px=24, samples_per_shard=5,
                       seed=4)


def test_offsets_match_tarfile_for_every_member(shards):
    manifest = load_manifest(shards)
    for split in ("train", "val", "test"):
        table = ShardTable.load(manifest.shards(split))
        seen = 0
        for si, sh in enumerate(manifest.shards(split)):
            with tarfile.open(sh.path) as tf:
                members = [m for m in tf.getmembers() if m.isfile()]
            rows = np.flatnonzero(table.shard == si)
            listed = [m for r in rows.tolist() for m in table.samples[r].members]
            assert [(m.name, m.offset_data, m.size) for m in members] == [(m.name, m.offset, m.size) for m in listed]
            seen += len(members)
        assert seen == 4 * len(table) == 4 * manifest.num_samples(split)


def test_payloads_pids_views_and_index_text(shards):
    manifest = load_manifest(shards)
    table = ShardTable.load(manifest.shards("train"), need=("jpg", "json", "pid", "lbl"))
    metas = [json.loads(b) for b in table.payloads("json")]
    assert table.views() == [m["view"] for m in metas]
    assert table.pids().tolist() == [int(m["patient_id"][1:]) for m in metas]
    assert [table.samples[i].key for i in range(len(table))] == [
        f"test-p{int(m['patient_id'][1:]):05d}-s{m['study_id'][1:]}-v1" for m in metas]
    i = len(table) - 1
    assert table.read(i, "jpg")[:2] == b"\xff\xd8" and len(table.read(i, "lbl")) == 4 * len(manifest.label_names)
    loc = table.locations("jpg")
    assert loc.shape == (len(table), 2) and loc.dtype == np.int64
    for sh in manifest.shards("train"):  # a subset index copies ingest's lines byte for byte
        assert index_text(read_index(sh.index_path)) == sh.index_path.read_text()


def test_bad_index_and_missing_member_are_one_line_errors(shards, tmp_path):
    sh = load_manifest(shards).shards("val")[0]
    bad = tmp_path / "bad.idx"
    bad.write_text("v1.1 1\njpg 512 10 a.jpg\n")
    with pytest.raises(ShardFormatError, match=r"bad\.idx: DALI index version v1\.1"):
        read_index(bad)
    bad.write_text("v1.2 2\njpg 512 10 a.jpg\n")
    with pytest.raises(ShardFormatError, match="announces 2 samples but lists 1"):
        read_index(bad)
    with pytest.raises(ShardFormatError, match="samples indexed, manifest says 99"):
        read_index(sh.index_path, num_samples=99)
    with pytest.raises(ShardFormatError, match=r"\.idx: a sample lacks jpg/cls"):
        ShardTable.load([sh], need=("jpg", "cls"))
    with pytest.raises(ShardFormatError, match="sample 0 has no .cls component"):
        ShardTable.load([sh]).read(0, "cls")
