"""`ingest build-shards` end to end on small real-layout folders: CheXpert rows from the real CSV with real
images, round trips through webdataset and DALI's CPU reader, determinism across worker counts, resume after
a crash and after kill -9, rejects, refusal to overwrite, shard size targeting, verify and stats."""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest import build, stats, verify
from ingest.schema import CHEXPERT_LABELS, COMPONENTS, SPLITS, load_manifest
from ingest.shards import iter_shard

DESIGN_FIELDS = {"dataset", "patient_id", "study_id", "view", "sex", "age", "labels", "split", "source_path",
                 "source_sha256", "original_width", "original_height", "original_bit_depth",
                 "photometric_interpretation", "preprocessing", "flags"}
ROOT = Path(__file__).resolve().parents[1]


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _chexpert_rows(shared_data, first: int = 40) -> list[dict]:
    """The CSV's first rows plus its first Frontal row coded LL (a view contradiction)."""
    out = []
    with gzip.open(shared_data / "metadata" / "chexpert_train.csv.gz", "rt", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i < first:
                out.append(row)
            elif row["Frontal/Lateral"] == "Frontal" and row["AP/PA"] == "LL":
                out.append(row)
                break
    return out


@pytest.fixture
def chexpert_root(shared_data, tmp_path):
    """A CheXpert-v1.0-small folder: train.csv from real rows, 320x390 grayscale JPEGs from real CXRs;
    one listed file missing and one zero-byte."""
    rows = _chexpert_rows(shared_data)
    root = tmp_path / "CheXpert-v1.0-small"
    sources = sorted((shared_data / "pneumonia-mini" / "Normal").glob("*.jpeg"))
    for i, row in enumerate(rows):
        path = root / row["Path"].split("/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.open(sources[i]).convert("L").resize((320, 390), Image.BICUBIC)
        path.write_bytes(_jpeg(np.asarray(img)))
    frontal = [i for i, r in enumerate(rows) if r["Frontal/Lateral"] == "Frontal"]
    (root / rows[frontal[2]]["Path"].split("/", 1)[1]).unlink()
    (root / rows[frontal[4]]["Path"].split("/", 1)[1]).write_bytes(b"")
    broken = {frontal[2], frontal[4]}
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root, rows, broken


def _build(root: Path, out: Path, *extra: str, source: str = "chexpert") -> int:
    return build.main(["--source", source, "--root", str(root), "--out", str(out), "--no-progress", *extra])


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _wds_samples(out: Path, split: str) -> list[dict]:
    import webdataset as wds
    m = load_manifest(out)
    return [s for sh in m.shards(split) for s in wds.WebDataset(str(sh.path), shardshuffle=False)]


def test_chexpert_build_roundtrip(chexpert_root, tmp_path, capsys):
    root, rows, broken = chexpert_root
    out = tmp_path / "out"
    assert _build(root, out, "--views", "frontal", "--workers", "2", "--shard-max-samples", "4", "--size", "64",
                  "--val-frac", "0.3") == 0
    m = load_manifest(out)
    laterals = sum(r["Frontal/Lateral"] == "Lateral" for r in rows)
    frontal = len(rows) - laterals
    c = m.data["counts"]
    assert (c["inputs"], c["filtered"], c["rejected"], c["written"]) == (len(rows), laterals, 2, frontal - 2)
    assert sorted(r["reason"] for r in m.data["rejects"]) == ["missing file", "zero-byte file"]
    tsv = (out / "rejects.tsv").read_text().splitlines()
    assert tsv[0] == "source_path\treason" and len(tsv) == 3
    assert len((out / "filtered.tsv").read_text().splitlines()) == 1 + laterals
    printed = capsys.readouterr().out
    assert f"inputs {len(rows)} = written {frontal - 2} + rejected 2 + filtered {laterals}" in printed
    assert set(m.data["splits"]) == set(SPLITS) and m.data["splits"]["test"]["num_samples"] == 0  # train.csv: no test
    by_path = {r["Path"].split("/", 1)[1]: r for r in rows}
    patients = json.loads((out / "patients.json").read_text())
    assert m.num_patients == len(patients) == len({r["Path"].split("/")[2] for r in rows
                                                      if r["Frontal/Lateral"] == "Frontal"})
    seen_split = {}
    for split in ("train", "val"):
        samples = _wds_samples(out, split)
        assert len(samples) == m.num_samples(split) > 0
        for s in samples:
            meta = json.loads(s["json"])
            assert set(meta) == DESIGN_FIELDS and {k for k in s if not k.startswith("__")} == set(COMPONENTS)
            row = by_path[meta["source_path"]]
            want = {n: (None if row[n] == "" else int(float(row[n]))) for n in CHEXPERT_LABELS}
            assert meta["labels"] == want and meta["split"] == split
            lbl = struct.unpack("<14f", s["lbl"])
            assert all((math.isnan(v) if want[n] is None else v == want[n]) for n, v in zip(CHEXPERT_LABELS, lbl))
            (pid,) = struct.unpack("<q", s["pid"])
            assert patients[pid] == meta["patient_id"]
            assert seen_split.setdefault(meta["patient_id"], split) == split
            assert (meta["original_width"], meta["original_height"], meta["original_bit_depth"]) == (320, 390, 8)
            assert Image.open(io.BytesIO(s["jpg"])).size == (64, 78)
            if row["AP/PA"] == "LL":
                assert meta["view"] == "UNKNOWN" and "AP/PA=LL" in meta["flags"]["view_contradiction"]
            else:
                assert meta["view"] == row["AP/PA"]
    assert verify.main([str(out)]) == 0
    assert stats.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "patients 2+ images" in printed and "view_contradiction" in printed
    flagged = sum(stats.collect(out)["splits"][s]["flags"].get("view_contradiction", 0) for s in ("train", "val"))
    assert flagged == sum(r["AP/PA"] == "LL" for r in rows) == 1
    _dali_roundtrip(out, "train")


def _dali_roundtrip(out: Path, split: str) -> None:
    from nvidia.dali import fn, pipeline_def, types
    m = load_manifest(out)
    shards = m.shards(split)
    n = m.num_samples(split)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl, pid = fn.readers.webdataset(
            paths=[str(s.path) for s in shards], index_paths=[str(s.index_path) for s in shards],
            ext=["jpg", "lbl", "pid"], dtypes=[types.UINT8, types.FLOAT, types.INT64],
            missing_component_behavior="error", random_shuffle=False, name="reader")
        return jpg, fn.decoders.image(jpg, device="cpu", output_type=types.GRAY), lbl, pid

    p = pipe()
    p.build()
    jpg, img, lbl, pid = p.run()
    ref = [s for sh in shards for s in iter_shard(sh.path)]
    for i, s in enumerate(ref):
        assert np.array_equal(np.asarray(jpg[i]).tobytes(), s["jpg"])
        decoded = np.asarray(Image.open(io.BytesIO(s["jpg"])))
        assert np.asarray(img[i]).shape == (*decoded.shape, 1)
        assert np.array_equal(np.asarray(lbl[i]), np.frombuffer(s["lbl"], "<f4"), equal_nan=True)
        assert np.asarray(pid[i]).tolist() == [struct.unpack("<q", s["pid"])[0]]


def test_output_is_independent_of_worker_count(chexpert_root, tmp_path):
    root, _, _ = chexpert_root
    args = ("--shard-max-samples", "3", "--size", "48", "--split-mode", "hash", "--test-frac", "0.25",
            "--val-frac", "0.3")
    assert _build(root, tmp_path / "w0", "--workers", "0", *args) == 0
    assert _build(root, tmp_path / "w2", "--workers", "2", *args) == 0
    a, b = _files(tmp_path / "w0"), _files(tmp_path / "w2")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert not any(k.startswith(".ingest-state") for k in a)
    m = load_manifest(tmp_path / "w0")
    assert all(m.num_samples(s) > 0 for s in SPLITS)
    shuffle = _build(root, tmp_path / "s1", "--workers", "0", "--shuffle-seed", "1", *args)
    assert shuffle == 0 and _files(tmp_path / "s1")["train/shard-000000.tar"] != a["train/shard-000000.tar"]


def test_resume_after_crash_is_byte_identical(chexpert_root, tmp_path, monkeypatch):
    root, _, _ = chexpert_root
    args = ("--workers", "0", "--shard-max-samples", "2", "--size", "32")
    assert _build(root, tmp_path / "ref", *args) == 0
    real_save, calls = build.save_segment, []

    def crashing_save(out, seg):
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated crash after the 5th shard's rename, before its segment file")
        calls.append(seg)
        real_save(out, seg)

    monkeypatch.setattr(build, "save_segment", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _build(root, tmp_path / "out", *args)
    monkeypatch.setattr(build, "save_segment", real_save)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and len(list((out / ".ingest-state").glob("train-*.json"))) == 4
    first = out / "train" / "shard-000000.tar"
    mtime = first.stat().st_mtime_ns
    (out / "train" / "shard-000009.tar.tmp").write_bytes(b"half a shard")  # debris of a killed write
    assert _build(root, out, *args) == 0
    assert first.stat().st_mtime_ns == mtime  # finished shards were kept, not redone
    ref, got = _files(tmp_path / "ref"), _files(out)
    assert ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)


def test_kill_9_then_resume_is_byte_identical(tmp_path):
    root = tmp_path / "root"
    rng = np.random.default_rng(0)
    for cls, n in (("normal", 70), ("pneumonia", 50)):
        (root / cls).mkdir(parents=True)
        for i in range(n):  # noisy PNGs decode slowly enough to interrupt the run mid-way
            Image.fromarray(rng.integers(0, 256, (384, 320), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    args = ["--source", "folder", "--root", str(root), "--workers", "1", "--shard-max-samples", "4", "--size", "32",
            "--no-progress"]
    assert build.main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ingest", "build-shards", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((out / ".ingest-state").glob("*-000001.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the build finished before it could be killed"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker, mid-run
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert build.main([*args, "--out", str(out)]) == 0
    ref, got = _files(tmp_path / "ref"), _files(out)
    assert ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)
    assert verify.main([str(out)]) == 0


def test_refuses_to_overwrite_and_strict(chexpert_root, tmp_path, capsys):
    root, _, _ = chexpert_root
    out = tmp_path / "out"
    assert _build(root, out, "--workers", "0", "--size", "32") == 0
    assert _build(root, out, "--workers", "0", "--size", "32") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _build(root, out, "--workers", "0", "--size", "32", "--overwrite", "--strict") == 1  # 2 rejects
    assert not (out / "manifest.json").exists()  # a failed run does not look finished
    assert len((out / "rejects.tsv").read_text().splitlines()) == 1 + 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("keep me")
    assert _build(root, tmp_path / "foreign", "--workers", "0", "--overwrite") == 2
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "keep me"
    partial = tmp_path / "partial"
    assert _build(root, partial, "--workers", "0", "--size", "32") == 0
    (partial / "manifest.json").unlink()
    (partial / ".ingest-state").mkdir()
    (partial / ".ingest-state" / "plan.json").write_text('{"fingerprint": "other"}')
    assert _build(root, partial, "--workers", "0", "--size", "32") == 2
    assert "other arguments" in capsys.readouterr().err
    assert _build(root, tmp_path / "x", "--size", "-1") == 2
    assert _build(root, tmp_path / "y", "--views", "sideways") == 2
    assert _build(root, root / "shards") == 2 and not (root / "shards").exists()


def test_shards_are_size_targeted(chexpert_root, tmp_path):
    root, _, _ = chexpert_root
    out = tmp_path / "out"
    assert _build(root, out, "--workers", "0", "--size", "128", "--shard-max-bytes", "40K") == 0
    m = load_manifest(out)
    shards = m.shards("train")
    assert len(shards) > 3
    for sh in shards:
        assert sh.path.stat().st_size == sh.num_bytes
        assert sh.num_bytes <= 40 * 1024 or sh.num_samples == 1
    # Greedy: a shard was cut only because the next sample would not fit.
    sizes = [sh.num_bytes for sh in shards]
    assert max(sizes[:-1]) > 20 * 1024


def test_verify_catches_damage(chexpert_root, tmp_path, capsys):
    root, _, _ = chexpert_root
    out = tmp_path / "out"
    assert _build(root, out, "--workers", "0", "--size", "32", "--shard-max-samples", "100") == 0
    tar = load_manifest(out).shards("train")[0].path
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    (out / "val" / "stray.tar").write_bytes(b"")
    assert verify.main([str(out)]) == 1
    err = capsys.readouterr().err
    assert "sha256 differs" in err and "stray.tar: not listed" in err
    assert verify.main([str(tmp_path / "nothing")]) == 1


def test_stats_counts(chexpert_root, tmp_path, capsys):
    root, rows, broken = chexpert_root
    out = tmp_path / "out"
    assert _build(root, out, "--workers", "0", "--size", "32", "--split-mode", "hash", "--val-frac", "0",
                  "--test-frac", "0") == 0
    st = stats.collect(out)
    train = st["splits"]["train"]
    kept = [r for i, r in enumerate(rows) if i not in broken]
    assert train["samples"] == len(kept)
    assert train["views"]["LAT"] == sum(r["Frontal/Lateral"] == "Lateral" for r in kept)
    per_patient = Counter(r["Path"].split("/")[2] for r in kept)
    assert train["patients"] == len(per_patient)
    assert train["patients_2plus"] == sum(c >= 2 for c in per_patient.values())
    for n in CHEXPERT_LABELS:
        want = Counter("blank" if r[n] == "" else str(int(float(r[n]))) for r in kept)
        assert {k: v for k, v in train["labels"][n].items() if v} == dict(want)


def test_verify_catches_patient_in_two_splits_and_bad_pid(chexpert_root, tmp_path, capsys):
    from ingest.shards import write_shard
    root, _, _ = chexpert_root
    out = tmp_path / "out"
    assert _build(root, out, "--workers", "0", "--size", "32", "--val-frac", "0.4") == 0
    m = load_manifest(out)
    train = next(iter_shard(m.shards("train")[0].path))
    moved = dict(train, json=json.dumps({**json.loads(train["json"]), "split": "val"}).encode())
    bad_pid = dict(moved, __key__=train["__key__"] + "x", pid=struct.pack("<q", m.num_patients + 5))
    val = m.shards("val")[0]
    samples = list(iter_shard(val.path)) + [moved, bad_pid]
    w = write_shard(val.path, samples)
    data = json.loads((out / "manifest.json").read_text())
    data["splits"]["val"]["shards"][0].update(num_samples=w.num_samples, sha256=w.sha256, num_bytes=w.num_bytes)
    data["splits"]["val"]["num_samples"] += 2
    (out / "manifest.json").write_text(json.dumps(data))
    assert verify.main([str(out), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{train['__key__']}: duplicate key" in err
    assert "is in both train and val" in err
    assert f".pid {m.num_patients + 5} outside the patient table" in err
    assert "sha256" not in err  # the manifest was updated: only the real problems are reported


def test_run_with_no_sample_leaves_no_manifest_and_reruns_without_overwrite(shared_data, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "a.png").write_bytes(b"")
    (root / "cls" / "b.txt").write_text("x")
    out = tmp_path / "out"
    args = ["--source", "folder", "--root", str(root), "--out", str(out), "--workers", "0", "--no-progress",
            "--size", "32"]
    assert build.main(args) == 1
    assert "no sample written" in capsys.readouterr().err
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == [".ingest-state/failed.json", ".ingest-state/plan.json", "filtered.tsv", "rejects.tsv"]
    rejects = (out / "rejects.tsv").read_text().splitlines()
    assert rejects[0] == "input_id\tsha256\treason" and len(rejects) == 3
    assert verify.main([str(out)]) == 1
    # The inputs fixed (a real film, the stray text file gone): the same command finishes, no --overwrite.
    Image.open(sorted((shared_data / "pneumonia-mini" / "Normal").glob("*.jpeg"))[0]).convert("L").save(
        root / "cls" / "a.png")
    (root / "cls" / "b.txt").unlink()
    assert build.main(args) == 0
    assert "starting over" in capsys.readouterr().out
    assert load_manifest(out).data["counts"] == {"inputs": 1, "written": 1, "rejected": 0, "filtered": 0}
    assert not (out / ".ingest-state").exists()
    assert build.main([*args[:5], str(tmp_path / "fresh"), *args[6:]]) == 0
    ref, got = _files(tmp_path / "fresh"), _files(out)
    assert ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)
    assert verify.main([str(out)]) == 0


def test_strict_failure_resumes_to_the_same_bytes(chexpert_root, tmp_path, capsys):
    root, _, _ = chexpert_root
    args = ("--workers", "0", "--size", "32", "--shard-max-samples", "4")
    assert _build(root, tmp_path / "ref", *args) == 0
    out = tmp_path / "out"
    assert _build(root, out, *args, "--strict") == 1
    assert not (out / "manifest.json").exists() and not (out / "patients.json").exists()
    assert len((out / "rejects.tsv").read_text().splitlines()) == 1 + 2
    # Only segments before the first reject stay, each with its shard; nothing else of the run is left.
    segs = sorted((out / ".ingest-state").glob("train-*.json"))
    shards = sorted(p.name for p in (out / "train").iterdir()) if (out / "train").is_dir() else []
    assert all(not json.loads(p.read_text())["rejects"] for p in segs)
    assert len(shards) == 2 * len(segs)
    assert verify.main([str(out)]) == 1
    capsys.readouterr()
    assert _build(root, out, *args) == 0  # no --overwrite: the failed run was not finished
    ref, got = _files(tmp_path / "ref"), _files(out)
    assert ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)


def test_verify_refuses_a_manifest_of_zero_samples(chexpert_root, tmp_path, capsys):
    root, _, _ = chexpert_root
    out = tmp_path / "out"
    assert _build(root, out, "--workers", "0", "--size", "32") == 0
    data = json.loads((out / "manifest.json").read_text())
    for split in SPLITS:  # what older versions wrote for a run where every input was rejected
        data["splits"][split].update(num_samples=0, num_patients=0, shards=[])
        if (out / split).is_dir():
            for p in (out / split).iterdir():
                p.unlink()
    (out / "manifest.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert verify.main([str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "0 samples" in err[0] and str(out) in err[0]


def test_failed_early_checks_leave_nothing_in_out(chexpert_root, tmp_path, capsys):
    root, _, _ = chexpert_root
    bad_csv = tmp_path / "bad-csv"
    bad_csv.mkdir()
    (bad_csv / "train.csv").write_bytes(b"\xff\xfe\x00garbage\n")
    empty_csv = tmp_path / "empty-csv"
    empty_csv.mkdir()
    (empty_csv / "train.csv").write_bytes(b"")
    bad_nih = tmp_path / "bad-nih"
    (bad_nih / "images").mkdir(parents=True)
    (bad_nih / "Data_Entry_2017.csv").write_bytes(b"\xff\xfe\x00garbage\n")
    out = tmp_path / "new" / "out"
    cases = [  # bad --root, bad options, unreadable CSVs, the wrong --source (folder: CheXpert markers)
        {"--root": str(tmp_path / "absent")}, {"--size": "-1"}, {"--quality": "0"}, {"--views": "sideways"},
        {"--modalities": ""}, {"--root": str(bad_csv)}, {"--root": str(empty_csv)}, {"--source": "nih"},
        {"--source": "folder"}, {"--force-folder": None}, {"--source": "nih", "--root": str(bad_nih)},
    ]
    for extra in cases:
        opts = {"--source": "chexpert", "--root": str(root), "--out": str(out), "--workers": "0", **extra}
        argv = [x for k, v in opts.items() for x in ((k,) if v is None else (k, v))] + ["--no-progress"]
        assert build.main(argv) == 2, extra
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("ingest build-shards: "), (extra, err)
        assert not (tmp_path / "new").exists(), extra
    # A finished output stays as it was when a rerun with --overwrite fails its checks.
    done = tmp_path / "done"
    assert _build(root, done, "--workers", "0", "--size", "32") == 0
    before = _files(done)
    assert _build(bad_csv, done, "--workers", "0", "--size", "32", "--overwrite") == 2
    assert _files(done) == before


def test_rejects_tsv_has_one_header_whatever_the_rows(shared_data, tmp_path):
    from ingest.manifest import FILTERED_NAME
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    films = sorted((shared_data / "pneumonia-mini" / "Normal").glob("*.jpeg"))
    for i in range(2):
        Image.open(films[i]).convert("L").save(root / "cls" / f"{i}.png")
    args = ["--source", "folder", "--root", str(root), "--workers", "0", "--no-progress", "--size", "32"]
    assert build.main([*args, "--out", str(tmp_path / "clean")]) == 0
    (root / "cls" / "broken.png").write_bytes(b"")
    assert build.main([*args, "--out", str(tmp_path / "one-reject")]) == 0
    clean = (tmp_path / "clean" / "rejects.tsv").read_text().splitlines()
    full = (tmp_path / "one-reject" / "rejects.tsv").read_text().splitlines()
    assert clean == ["input_id\tsha256\treason"] and full[0] == clean[0] and len(full) == 2
    assert (tmp_path / "clean" / FILTERED_NAME).read_text() == "input_id\treason\n"
    assert (tmp_path / "one-reject" / FILTERED_NAME).read_text() == "input_id\treason\n"


def test_dead_or_hung_worker_costs_one_reject_and_the_run_goes_on(tmp_path, monkeypatch):
    """A decoder that segfaults, a worker killed -9 from outside mid-file, and one that hangs past
    --file-timeout-s: three rejects with their reasons, every other image written, the run finishes."""
    import threading
    from ingest import workers
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(root / "cls" / f"{i:02d}.png")
    for name in ("segv", "kill", "hang"):
        (root / "cls" / f"{name}.png").write_bytes(name.upper().encode() + b" not decoded by this test")
    pid_file = tmp_path / "busy.pid"
    real = workers.process_bytes

    def faulty(data, kind, size, quality):  # runs in the forked worker
        if data.startswith(b"SEGV"):
            import faulthandler
            faulthandler.disable()  # pytest's handler would print the child's stack: noise, not a failure
            os.kill(os.getpid(), signal.SIGSEGV)
        if data.startswith(b"KILL"):
            pid_file.write_text(str(os.getpid()))
            time.sleep(60)
        if data.startswith(b"HANG"):
            time.sleep(60)
        return real(data, kind, size, quality)

    monkeypatch.setattr(workers, "process_bytes", faulty)

    def killer():  # kill -9 the worker that is busy with kill.png, from outside
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert _build(root, out, "--source", "folder", "--workers", "2", "--file-timeout-s", "3", "--size", "16",
                  "--private-log", str(tmp_path / "log.tsv"), source="folder") == 0
    t.join()
    assert time.monotonic() - t0 < 45
    m = load_manifest(out)
    assert m.data["counts"] == {"inputs": 15, "written": 12, "rejected": 3, "filtered": 0}
    log = {line.split("\t")[4]: line.split("\t")[3] for line in (tmp_path / "log.tsv").read_text().splitlines()[1:]}
    assert log["cls/segv.png"] == "decoder process killed by SIGSEGV while reading this file"
    assert log["cls/kill.png"] == "decoder process killed by SIGKILL while reading this file"
    assert log["cls/hang.png"] == "decoding took longer than --file-timeout-s 3"
    assert verify.main([str(out)]) == 0


def test_chexpert_root_one_level_up_is_found(chexpert_root, tmp_path, tmp_path_factory, capsys):
    root, _, _ = chexpert_root
    outs = tmp_path_factory.mktemp("outs")  # outside tmp_path: --out must not be inside --root
    args = ("--workers", "0", "--size", "32")
    assert _build(root, outs / "ref", *args) == 0
    capsys.readouterr()
    assert _build(tmp_path, outs / "above", *args) == 0  # tmp_path holds CheXpert-v1.0-small
    assert f"using {root} as --root" in capsys.readouterr().out
    ref, got = _files(outs / "ref"), _files(outs / "above")
    assert ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)
    (tmp_path / "CheXpert-v1.0").symlink_to(root)  # two candidates: the user chooses
    assert _build(tmp_path, outs / "two", *args) == 2
    err = capsys.readouterr().err
    assert "several CheXpert folders (CheXpert-v1.0, CheXpert-v1.0-small)" in err and not (outs / "two").exists()


def test_folder_source_refuses_a_chexpert_tree_unless_forced(chexpert_root, tmp_path, tmp_path_factory, capsys):
    root, rows, _ = chexpert_root
    outs = tmp_path_factory.mktemp("outs")
    for given in (root, tmp_path):  # the CheXpert folder itself, or the folder above it
        assert _build(given, outs / "refused", "--workers", "0", source="folder") == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "use --source chexpert" in err[0] and "train.csv" in err[0]
        assert "--force-folder" in err[0]
        assert not (outs / "refused").exists()
    assert _build(root, outs / "forced", "--workers", "0", "--size", "32", "--force-folder", source="folder") == 0
    m = load_manifest(outs / "forced")
    assert m.label_names == ["train"]  # what was asked for: class folders, whatever they are named
    assert m.data["counts"]["inputs"] == len(rows) - 1 + 1  # the films (one listed film is absent) + train.csv
