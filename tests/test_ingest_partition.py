"""`ingest build-shards --part K/N` + `ingest merge`: the merged folder is byte-identical to one whole run (N = 1,
3, 7, a part interrupted and rerun, shards cut by bytes so the parts' own cuts differ from the final ones), a part
writes no manifest, verify and merge refuse an unfinished partitioned OUT with one line."""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest import build, merge, verify
from ingest.plan import Plan
from ingest.records import Record
from ingest.schema import SPLITS
from ingest.state import PARTS_DIR, part_dir


@pytest.fixture
def folder_root(tmp_path) -> Path:
    """Three classes of small noisy JPEGs (encoded sizes differ), one zero-byte and one non-image file."""
    root = tmp_path / "root"
    rng = np.random.default_rng(0)
    for cls, n in (("normal", 14), ("pneumonia", 10), ("covid", 6)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            h = int(rng.integers(40, 90))
            noise = rng.integers(0, 256, (h, 48), dtype=np.uint8) // int(rng.integers(1, 8))
            Image.fromarray(noise).save(root / cls / f"{i:02d}.jpg", quality=90)
    (root / "normal" / "empty.jpg").write_bytes(b"")
    (root / "covid" / "notes.jpg").write_bytes(b"not an image")
    return root


def _args(root: Path, out: Path, tmp_path: Path, log: str) -> list[str]:
    # --shard-max-bytes is what cuts here: the parts' own cuts do not fall where one run cuts
    return ["--source", "folder", "--root", str(root), "--out", str(out), "--workers", "0", "--size", "32",
            "--shard-max-bytes", "24k", "--shard-max-samples", "6", "--split-mode", "hash", "--test-frac", "0.2",
            "--val-frac", "0.2", "--salt-file", str(tmp_path / "salt"), "--private-log", str(tmp_path / log),
            "--no-progress"]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _reference(folder_root, tmp_path) -> dict[str, bytes]:
    assert build.main(_args(folder_root, tmp_path / "ref", tmp_path, "ref.tsv")) == 0
    ref = _files(tmp_path / "ref")
    assert len([k for k in ref if k.startswith("train/")]) >= 6 and b"zero-byte" in ref["rejects.tsv"]
    return ref


@pytest.mark.parametrize("n", [1, 3, 7])
def test_parts_then_merge_equal_one_run(folder_root, tmp_path, capsys, n):
    ref = _reference(folder_root, tmp_path)
    out = tmp_path / "out"
    args = _args(folder_root, out, tmp_path, "parts.tsv")
    for k in reversed(range(n)):  # any order: array tasks finish when they finish
        assert build.main([*args, "--part", f"{k}/{n}"]) == 0
        assert not (out / "manifest.json").exists()
    capsys.readouterr()
    assert verify.main([str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ingest verify: FAILED: {out}: the parts of a partitioned ingest, not merged ({n} of {n} parts "
                   f"complete); run `ingest merge {out}` once all are"]
    part_tars = {v for k, v in _files(out / PARTS_DIR).items() if k.endswith(".tar")}
    assert merge.main([str(out), "--no-progress"]) == 0
    got = _files(out)
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref)
    assert not (out / PARTS_DIR).exists()
    if n == 7:  # the parts cut their slices by size on their own; the merge re-cuts as one run does
        assert not {v for k, v in got.items() if k.endswith(".tar")} <= part_tars
    assert (tmp_path / "parts.tsv").read_bytes() == (tmp_path / "ref.tsv").read_bytes()  # the private log too
    assert verify.main([str(out)]) == 0


def test_interrupted_part_reruns_alone_and_merge_waits_for_it(folder_root, tmp_path, capsys, monkeypatch):
    ref = _reference(folder_root, tmp_path)
    out, n = tmp_path / "out", 3
    args = _args(folder_root, out, tmp_path, "parts.tsv")
    for k in (0, 2):
        assert build.main([*args, "--part", f"{k}/{n}"]) == 0
    real_save, calls = build.save_segment, []

    def crashing_save(folder, seg):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill after the 3rd shard's rename, before its segment file")
        calls.append(seg)
        real_save(folder, seg)

    monkeypatch.setattr(build, "save_segment", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        build.main([*args, "--part", f"1/{n}"])
    monkeypatch.setattr(build, "save_segment", real_save)
    capsys.readouterr()
    assert merge.main([str(out), "--no-progress"]) == 2  # one line naming the part, nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"part 1 of {n} not complete" in err[0]
    assert not (out / "manifest.json").exists() and not (out / ".ingest-state").exists()
    assert verify.main([str(out)]) == 1
    assert "(2 of 3 parts complete)" in capsys.readouterr().err
    first = next((part_dir(out, 1, n) / s / "shard-000000.tar" for s in SPLITS
                  if (part_dir(out, 1, n) / s / "shard-000000.tar").is_file()))
    mtime = first.stat().st_mtime_ns
    assert build.main([*args, "--part", f"1/{n}"]) == 0  # resumes like a whole run
    assert first.stat().st_mtime_ns == mtime
    assert merge.main([str(out), "--no-progress"]) == 0
    got = _files(out)
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref)


def test_merge_refuses_parts_of_other_arguments_and_a_whole_run_refuses_parts(folder_root, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(folder_root, out, tmp_path, "parts.tsv")
    assert build.main([*args, "--part", "0/2"]) == 0
    assert build.main([*args, "--shuffle-seed", "1", "--part", "1/2"]) == 0
    capsys.readouterr()
    assert merge.main([str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part 1 of 2 were made from other arguments" in err[0]
    assert build.main(args) == 2
    assert "holds the parts of a partitioned ingest" in capsys.readouterr().err
    assert merge.main([str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "holds no parts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        build.main([*args, "--part", "2/2"])
    assert e.value.code == 2


def test_merge_reads_relative_paths_from_the_parts_working_folder(folder_root, tmp_path, monkeypatch):
    ref = _reference(folder_root, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = _args(Path("root"), Path("out"), Path("."), "parts.tsv")
    for k in range(2):
        assert build.main([*args, "--part", f"{k}/2"]) == 0
    saved = json.loads((part_dir(tmp_path / "out", 0, 2) / ".ingest-state" / "args.json").read_text())
    assert "--part" not in saved["argv"] and saved["cwd"] == str(tmp_path)
    monkeypatch.chdir(folder_root)  # the merge runs elsewhere
    assert merge.main([str(tmp_path / "out"), "--no-progress"]) == 0
    got = _files(tmp_path / "out")
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref)


def test_part_ranges_cover_every_planned_record_once():
    rng = random.Random(0)
    for _ in range(200):
        lengths = {s: rng.randrange(0, 9) for s in SPLITS}
        order = {s: [Record(f"{s}{i}", "d", f"{s}/{i}", "p", "s", "PA", {}) for i in range(m)]
                 for s, m in lengths.items()}
        plan = Plan("d", (), [], {}, order, [], [], 0)
        n = rng.randrange(1, 9)
        seen = []
        for k in range(n):
            ranges = plan.part_ranges(k, n)
            seen += [order[s][i].key for s in SPLITS for i in range(*ranges[s])]
            assert sum(e - b for b, e in ranges.values()) in (plan.num_planned // n, -(-plan.num_planned // n))
        assert seen == [r.key for s in SPLITS for r in order[s]]


def test_slurm_script_submits_the_array_then_the_merge_after_it(tmp_path):
    """Stand-in `sbatch` and `ingest` on PATH record their arguments: the script run on the login node submits
    an array of N tasks and a merge with afterok on it; inside a task it runs part $SLURM_ARRAY_TASK_ID/N."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_ingest.sbatch"
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    for name, reply in (("sbatch", "echo 4242"), ("ingest", "true")):
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {calls}\n{reply}\n')
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    args = ["--source", "folder", "--root", "/data/in", "--out", "/data/my shards"]
    done = subprocess.run(["bash", str(script), "7", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    submitted = calls.read_text().splitlines()
    assert submitted[0] == f"sbatch --parsable --array=0-6 {script} 7 {' '.join(args)}"
    assert "--dependency=afterok:4242" in submitted[1] and "ingest merge /data/my\\ shards" in submitted[1]
    calls.unlink()
    task = subprocess.run(["bash", str(script), "7", *args], env={**env, "SLURM_ARRAY_TASK_ID": "3",
                                                                 "SLURM_CPUS_PER_TASK": "5"})
    assert task.returncode == 0
    assert calls.read_text().splitlines() == [f"ingest build-shards {' '.join(args)} --workers 5 --no-progress "
                                              "--part 3/7"]
    bad = subprocess.run(["bash", str(script), "x", *args], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr
