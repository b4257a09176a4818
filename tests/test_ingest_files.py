"""`ingest.files`: atomic publishing (old file kept and no temp file left on failure, unique temp files, modes)
and the file hash, plus how `ingest build-shards` treats the temp file a killed write left in OUT."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest

from ingest.build import BuildError, check_out, prepare_out
from ingest.files import atomic_write, atomic_write_bytes, atomic_write_text, sha256_file, temp_target


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_replaces_and_leaves_only_the_final_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old\n")
    atomic_write_bytes(path, b"new \xff")
    assert path.read_bytes() == b"new \xff"
    with atomic_write(path, text=True, newline="") as f:
        f.write("x\r\ny\n")
    assert path.read_bytes() == b"x\r\ny\n"
    assert _listing(tmp_path) == ["a.json"]


def test_failure_inside_the_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "model.pt"
    atomic_write_bytes(path, b"old content")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old content"
    assert _listing(tmp_path) == ["model.pt"]
    with pytest.raises(KeyboardInterrupt):  # an interrupt too: BaseException, not only Exception
        with atomic_write(tmp_path / "fresh.bin") as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == ["model.pt"]


def test_two_open_writers_do_not_share_a_temp_file(tmp_path):
    path = tmp_path / "shard.idx"
    with atomic_write(path) as a, atomic_write(path) as b:
        a.write(b"A" * 10)
        b.write(b"B" * 20)
        temps = _listing(tmp_path)
        assert len(temps) == 2 and {temp_target(n) for n in temps} == {"shard.idx"}
    # b finishes first, then a renames over it: one complete file, never a mix
    assert path.read_bytes() == b"A" * 10
    assert _listing(tmp_path) == ["shard.idx"]


def test_modes_follow_the_umask_like_open_and_private_files_stay_private(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "public.tsv", "x")
        (tmp_path / "plain.tsv").write_text("x")
        atomic_write_text(tmp_path / "private.tsv", "x", file_mode=0o600)
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode["public.tsv"] == mode["plain.tsv"] == 0o644
    assert mode["private.tsv"] == 0o600


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_sha256_file_equals_hashlib_across_chunk_boundaries(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk_bytes=4096) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_temp_target_only_names_atomic_write_debris():
    assert temp_target(".manifest.json.0123456789abcdef.tmp") == "manifest.json"
    assert temp_target("manifest.json.tmp") is None
    assert temp_target(".notes.tmp") is None
    assert temp_target(".manifest.json.0123456789ABCDEF.tmp") is None


def test_build_out_with_debris_of_a_killed_manifest_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a process killed inside the write: its temp file stays, the final name never appears
    code = ("import os, sys\nfrom ingest.files import atomic_write\n"
            "with atomic_write(sys.argv[1]) as f:\n    f.write(b'{\"half')\n    f.flush()\n    os._exit(9)\n")
    rc = subprocess.run([sys.executable, "-c", code, str(out / "manifest.json")], env=os.environ).returncode
    assert rc == 9
    (debris,) = _listing(out)
    assert temp_target(debris) == "manifest.json"
    check_out(out, overwrite=False)  # ingest's own debris: not a foreign folder
    prepare_out(out, overwrite=False)
    assert _listing(out) == []
    (out / ".notes.0123456789abcdef.tmp").write_text("someone else's")
    with pytest.raises(BuildError, match="not an ingest output folder"):
        check_out(out, overwrite=False)
