"""`ingest verify OUT`: re-read every shard with the webdataset library and check it against the manifest:
sizes and sha256, sample counts, DALI index offsets, components, that every image decodes as a baseline
single-channel JPEG, label and patient-index sizes, and that no patient spans two splits. Exit 1 on any problem."""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import struct
import sys
from pathlib import Path

from ingest.files import sha256_file
from ingest.schema import COMPONENTS, INDEX_SUFFIX, MANIFEST_NAME, SPLITS, ShardFormatError, load_manifest
from ingest.shards import read_index
from ingest.state import PARTS_DIR, part_status

MAX_PROBLEMS_SHOWN = 50


def check_jpeg(data: bytes, size: int) -> str | None:
    """None if ``data`` is a decodable baseline 8-bit single-channel JPEG with shorter side ``size``."""
    from PIL import Image
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode, progressive = im.format, im.mode, im.info.get("progressive") or im.info.get("progression")
        im.load()
    except Exception as e:
        return f"image does not decode ({type(e).__name__}: {e})"
    if fmt != "JPEG" or mode != "L":
        return f"image is {fmt} {mode}, expected a single-channel JPEG"
    if progressive:
        return "image is a progressive JPEG, expected baseline"
    if size > 0 and min(im.size) != size:
        return f"image is {im.size[0]}x{im.size[1]}, shorter side should be {size}"
    return None


def check_index(tar: Path, num_samples: int, samples: list[dict]) -> str | None:
    entries = read_index(tar.with_suffix(INDEX_SUFFIX))
    if len(entries) != num_samples:
        return f"index lists {len(entries)} samples, shard has {num_samples}"
    with open(tar, "rb") as f:
        for entry, sample in zip(entries, samples):
            for ext, (offset, size) in entry.items():
                f.seek(offset)
                if f.read(size) != sample.get(ext):
                    return f"index entry for {sample['__key__']}.{ext} does not point at its data"
    return None


_PATIENTS: dict = {}  # the patient table, set once per worker process (not pickled with every job)


def _set_patients(patients: list | None) -> None:
    _PATIENTS["table"] = patients


def check_shard(job: tuple) -> tuple[list[str], list[tuple[str, str]], int]:
    """One shard on its own: (problems, [(key, patient id)], samples read). Runs in a worker process."""
    import webdataset as wds
    sh, split, size, num_labels, num_patients = job
    patients = _PATIENTS.get("table")
    where = f"{split}/{sh.path.name}"
    problems: list[str] = []
    if sh.path.stat().st_size != sh.num_bytes:
        problems.append(f"{where}: {sh.path.stat().st_size} bytes, manifest says {sh.num_bytes}")
    if sha256_file(sh.path) != sh.sha256:
        problems.append(f"{where}: sha256 differs from the manifest")
    try:
        samples = list(wds.WebDataset(str(sh.path), shardshuffle=False))
    except Exception as e:
        return problems + [f"{where}: webdataset cannot read it ({type(e).__name__}: {e})"], [], 0
    if len(samples) != sh.num_samples:
        problems.append(f"{where}: {len(samples)} samples, manifest says {sh.num_samples}")
    problem = check_index(sh.path, len(samples), samples)
    if problem:
        problems.append(f"{where}: {problem}")
    seen = []
    for s in samples:
        sample_problems, patient = check_sample(s, split, size, num_labels, patients, num_patients)
        problems += [f"{where} {s['__key__']}: {p}" for p in sample_problems]
        seen.append((s["__key__"], patient))
    return problems, seen, len(samples)


def verify(out: Path, workers: int = 1) -> tuple[list[str], dict]:
    """All problems found (empty when the folder is good) and a few totals."""
    problems: list[str] = []
    try:
        m = load_manifest(out)
    except ShardFormatError as e:
        if (out / MANIFEST_NAME).is_file() or not (out / PARTS_DIR).is_dir():
            return [str(e)], {}
        try:
            n, status = part_status(out)
        except ValueError as why:
            return [str(why)], {}
        complete = sum(fingerprint is not None for fingerprint in status.values())
        return [f"{out}: the parts of a partitioned ingest, not merged ({complete} of {n} parts complete); "
                f"run `ingest merge {out}` once all are"], {}
    data = m.data
    listed = sum(int(sp.get("num_samples", 0) or 0) for sp in data.get("splits", {}).values())
    if listed == 0:  # older versions wrote a manifest for runs that wrote nothing: not a usable output
        return [f"{out}: the manifest lists 0 samples (a run that wrote nothing; see rejects.tsv and filtered.tsv)"], {}
    size = int(data.get("options", {}).get("size", 0) or 0)
    patients = None
    table = data.get("patient_table")
    if table:
        try:
            patients = json.loads((out / table).read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{out / table}: unreadable patient table ({e})")
    if patients is not None and len(patients) != m.num_patients:
        problems.append(f"{out / table}: {len(patients)} patients, manifest says {m.num_patients}")
    counts = data.get("counts")
    if counts and counts["inputs"] != counts["written"] + counts["rejected"] + counts["filtered"]:
        problems.append(f"manifest counts: inputs {counts['inputs']} != written + rejected + filtered")
    jobs = []
    for split in SPLITS:
        if split not in data["splits"]:
            continue
        shards = m.shards(split)
        listed = {s.path.name for s in shards} | {s.index_path.name for s in shards}
        folder = out / split
        if folder.is_dir():
            problems += [f"{p}: not listed in the manifest" for p in sorted(folder.iterdir()) if p.name not in listed]
        jobs += [(sh, split, size, len(m.label_names), m.num_patients) for sh in shards]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(min(workers, len(jobs)), initializer=_set_patients, initargs=(patients,)) as pool:
            results = pool.map(check_shard, jobs, chunksize=1)
    else:
        _set_patients(patients)
        results = [check_shard(j) for j in jobs]
    # Cross-shard rules: unique keys, a patient in one split only, counts per split.
    patient_split: dict[str, str] = {}
    keys: set[str] = set()
    per_split: dict[str, int] = {}
    for job, (shard_problems, seen, n) in zip(jobs, results):
        split = job[1]
        problems += shard_problems
        per_split[split] = per_split.get(split, 0) + n
        for key, patient in seen:
            if key in keys:
                problems.append(f"{split}/{job[0].path.name} {key}: duplicate key")
            keys.add(key)
            prev = patient_split.setdefault(patient, split)
            if prev != split:
                problems.append(f"{split}/{job[0].path.name} {key}: patient {patient} is in both {prev} and {split}")
    for split in data["splits"]:
        if per_split.get(split, 0) != data["splits"][split]["num_samples"]:
            problems.append(f"{split}: {per_split.get(split, 0)} samples in shards, "
                            f"manifest says {data['splits'][split]['num_samples']}")
    return problems, {"samples": sum(per_split.values()), "patients": len(patient_split)}


def check_sample(s: dict, split: str, size: int, num_labels: int, patients: list | None,
                 num_patients: int) -> tuple[list[str], str | None]:
    """(problems, patient id) of one sample read back from a shard."""
    out = []
    have = {k for k in s if not k.startswith("__")}
    if have != set(COMPONENTS):
        return [f"components {sorted(have)}, expected {list(COMPONENTS)}"], None
    problem = check_jpeg(s["jpg"], size)
    if problem:
        out.append(problem)
    try:
        meta = json.loads(s["json"])
    except ValueError as e:
        return out + [f"metadata is not JSON ({e})"], None
    if meta.get("split") != split:
        out.append(f"metadata split {meta.get('split')!r} in the {split} folder")
    if len(s["lbl"]) != 4 * num_labels:
        out.append(f".lbl has {len(s['lbl'])} bytes, expected {4 * num_labels}")
    else:
        values = struct.unpack(f"<{num_labels}f", s["lbl"])
        if any(not (math.isnan(v) or v in (1.0, 0.0, -1.0)) for v in values):
            out.append(f".lbl values {values} are not 1 / 0 / -1 / NaN")
    patient = meta.get("patient_id")
    if len(s["pid"]) != 8:
        return out + [f".pid has {len(s['pid'])} bytes, expected 8"], patient
    (pid,) = struct.unpack("<q", s["pid"])
    if not 0 <= pid < num_patients:
        out.append(f".pid {pid} outside the patient table (size {num_patients})")
    elif patients is not None and patients[pid] != patient:
        out.append(f".pid {pid} is {patients[pid]!r} in the table, metadata says {patient!r}")
    return out, patient


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ingest verify", description=__doc__)
    p.add_argument("out", type=Path, help="an ingest output folder (holding manifest.json)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="shards checked in parallel")
    a = p.parse_args(argv)
    problems, totals = verify(a.out, a.workers)
    if len(problems) == 1:  # one problem, one line
        print(f"ingest verify: FAILED: {problems[0]}", file=sys.stderr)
        return 1
    for line in problems[:MAX_PROBLEMS_SHOWN]:
        print(f"ingest verify: {line}", file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"ingest verify: ... and {len(problems) - MAX_PROBLEMS_SHOWN} more problems", file=sys.stderr)
    if problems:
        print(f"ingest verify: FAILED with {len(problems)} problem(s) in {a.out}", file=sys.stderr)
        return 1
    print(f"ingest verify: OK: {totals['samples']:,} samples of {totals['patients']:,} patients in {a.out}")
    return 0
