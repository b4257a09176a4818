"""`ingest build-shards`: read a source's records, plan splits and shard order, decode/resize/encode in worker
processes (results consumed in plan order), write size-targeted shards with DALI indexes, `manifest.json` last.

Resumable: each finished shard leaves a segment file (ingest/state.py); a re-run with the same arguments skips
verified segments and produces byte-identical output.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import struct
import sys
from pathlib import Path

from ingest.dicom_filters import POLICY_OPTIONS, add_policy_options, policy_from_args
from ingest.manifest import FILTERED_NAME, PATIENTS_NAME, summary_table, write_outputs
from ingest.plan import Plan, make_plan
from ingest.pseudonym import (PrivacyError, check_outside, default_private_log, default_salt_file,
                              load_or_create_salt, pseudonymise, write_private_log)
from ingest.records import Record, Reject, parse_views_option
from ingest.schema import INDEX_SUFFIX, MANIFEST_NAME, REJECTS_NAME, SHARD_PATTERN, SPLITS, VIEWS_CACHE_DIR
from ingest.shards import EncodedSample, tar_archive_bytes, write_encoded_shard
from ingest.sources import SOURCES, SourceError, SourceOptions, read_source
from ingest.state import STATE_DIR, Segment, load_segments, read_plan_fingerprint, save_plan_fingerprint, save_segment
from ingest.workers import GuardedPool, SampleTask, SampleWorker, TaskResult

LEGACY_SALT_FILE = "pseudonym-salt.txt"  # older versions kept the salt in OUT: refused now
OWN_ENTRIES = {*SPLITS, MANIFEST_NAME, REJECTS_NAME, FILTERED_NAME, PATIENTS_NAME, STATE_DIR, VIEWS_CACHE_DIR,
               MANIFEST_NAME + ".tmp", PATIENTS_NAME + ".tmp", REJECTS_NAME + ".tmp", FILTERED_NAME + ".tmp"}
# Sources whose paths, file names and ids may identify a patient: OUT shows only salted pseudonyms of them.
PRIVATE_SOURCES = ("dicom", "folder")
# Options that change the output bytes (recorded in the manifest and the resume fingerprint); --workers does not.
OUTPUT_OPTIONS = ("source", "size", "quality", "views", "split_mode", "split_seed", "shuffle_seed", "val_frac",
                  "test_frac", "shard_max_bytes", "shard_max_samples", "dataset_name")


class BuildError(RuntimeError):
    """Stops the run with a one-line reason (exit 2)."""


def parse_bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if t[-1:] in units else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 268435456, 256M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: size must be positive")
    return value


EPILOG = """sources (--source):
  chexpert  ROOT/train.csv, valid.csv (CheXpert v1.0 or v1.0-small); official split: valid.csv -> test,
            train.csv -> train, with --val-frac of its patients hashed into val
  nih       ROOT/Data_Entry_2017*.csv, PNGs in ROOT/, ROOT/images/ or ROOT/images_NNN/images/;
            train_val_list.txt + test_list.txt honoured when present
  mimic     ROOT/files/pXX/pNNN/sNNN/*.jpg + mimic-cxr-2.0.0-{metadata,split,chexpert}.csv[.gz]
  dicom     every file under ROOT (header filters: --modalities, --body-parts, --frames, ...; see
            `ingest scan` for a dry run); PatientID / StudyInstanceUID replaced by salted hashes
  folder    ROOT/<class>/**/image (one-hot labels over the class folders) or --labels-csv
output: OUT/{train,val,test}/shard-NNNNNN.tar + .idx, patients.json, rejects.tsv, filtered.tsv, manifest.json
(written last). inputs = written + rejected + filtered, always. A killed run continues when started again
with the same arguments, and the result is byte-identical to an uninterrupted run.
privacy (dicom, folder): OUT names inputs only by salted pseudonyms (input_id) and sha256; the salt
(--salt-file) and the map back to raw paths (--private-log) are kept outside OUT, mode 600."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest build-shards", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("--source", required=True, choices=sorted(SOURCES), help="dataset layout under --root")
    p.add_argument("--root", required=True, type=Path, help="dataset folder (CSV paths are taken relative to it)")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: SPLIT/shard-NNNNNN.tar + .idx, manifest.json")
    p.add_argument("--size", type=int, default=256, help="shorter side in pixels after resizing; 0 keeps the size")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the stored images")
    p.add_argument("--views", default="all", help="all | frontal (drops LAT) | comma list of PA,AP,LAT,UNKNOWN")
    p.add_argument("--split-mode", choices=("official", "hash"), default="official",
                   help="official: the dataset's split where it has one (val hashed out of its train pool); "
                        "hash: patient hash only")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient hash that assigns splits")
    p.add_argument("--val-frac", type=float, default=0.05, help="fraction of (training) patients in val")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction of patients in test (when hashed)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the sample order inside each split")
    p.add_argument("--shard-max-bytes", type=parse_bytes, default=256 * 2**20, help="target tar size (256M, 1G)")
    p.add_argument("--shard-max-samples", type=int, default=10000, help="most samples per shard")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="decoding processes (0: in-process)")
    p.add_argument("--labels-csv", type=Path, help="folder / dicom: CSV with path [, patient, study, view, sex, age] "
                                                   "and a 'label' column or one column per label")
    p.add_argument("--dataset-name", help="folder / dicom: value of the 'dataset' field and key prefix")
    p.add_argument("--salt-file", type=Path, default=argparse.SUPPRESS,
                   help=f"dicom / folder: the pseudonym key, kept by the data team outside OUT; created (mode 600, "
                        f"random) when absent and reused so a growing archive keeps its pseudonyms "
                        f"(default: {default_salt_file()})")
    p.add_argument("--private-log", type=Path, default=argparse.SUPPRESS,
                   help="dicom / folder: TSV mapping input_id to raw path for rejected / filtered inputs, outside "
                        "OUT, mode 600 (default: a file per OUT under $XDG_STATE_HOME/cxr-ssl/ingest/)")
    add_policy_options(p)
    p.add_argument("--file-timeout-s", type=float, default=300.0,
                   help="with --workers >= 1: a worker still decoding one file after this long is killed and the "
                        "file rejected (a crashing decoder costs its file only, whatever this is)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any input is rejected")
    p.add_argument("--overwrite", action="store_true", help="replace a finished (or differently configured) output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(a: argparse.Namespace) -> frozenset[str]:
    if a.size < 0:
        raise BuildError(f"--size {a.size}: must be >= 0")
    if not 1 <= a.quality <= 100:
        raise BuildError(f"--quality {a.quality}: must be in 1..100")
    if a.shard_max_samples < 1:
        raise BuildError(f"--shard-max-samples {a.shard_max_samples}: must be >= 1")
    if a.workers < 0:
        raise BuildError(f"--workers {a.workers}: must be >= 0")
    if a.file_timeout_s <= 0:
        raise BuildError(f"--file-timeout-s {a.file_timeout_s}: must be > 0")
    if a.dataset_name is not None and not all(c.isalnum() or c in "-_" for c in a.dataset_name):
        raise BuildError(f"--dataset-name {a.dataset_name!r}: letters, digits, '-' and '_' only")
    try:
        return parse_views_option(a.views)
    except ValueError as e:
        raise BuildError(str(e)) from None


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse finished or foreign output; with --overwrite remove only what ingest writes."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: --out exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if (out / LEGACY_SALT_FILE).exists():
        raise BuildError(f"{out / LEGACY_SALT_FILE}: a pseudonym salt inside OUT would ship with the shards; move it "
                         f"out of OUT and pass it with --salt-file")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES)
    if foreign:
        raise BuildError(f"{out}: not an ingest output folder (contains {', '.join(foreign[:3])}); "
                         "choose an empty --out")
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        raise BuildError(f"{out}: holds a finished ingest (manifest.json); pass --overwrite to rebuild it")
    if overwrite:
        for name in OWN_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


class Privacy:
    """How OUT names the inputs: raw relative paths (public datasets) or salted pseudonyms + a private log."""

    def __init__(self, a: argparse.Namespace):
        self.private = a.source in PRIVATE_SOURCES
        self.salt, self.salt_created, self.log = b"", False, None
        if not self.private:
            return
        salt_file = a.salt_file or default_salt_file()
        self.log = a.private_log or default_private_log(a.out)
        try:
            check_outside(salt_file, {"--out": a.out, "--root": a.root}, "--salt-file")
            check_outside(self.log, {"--out": a.out, "--root": a.root}, "--private-log")
            self.salt, self.salt_created = load_or_create_salt(salt_file)
        except PrivacyError as e:
            raise BuildError(str(e)) from None
        self.salt_file = salt_file

    def input_id(self, rel: str) -> str:
        return pseudonymise(rel, self.salt, "f") if self.private else rel

    def row(self, rel: str, reason: str, sha: str | None = None) -> dict:
        if not self.private:
            return {"source_path": rel, "reason": reason}
        return {"input_id": self.input_id(rel), "sha256": sha or "", "reason": reason}


def sample_task(seq: int, rec: Record, split: str, plan: Plan, privacy: Privacy) -> SampleTask:
    """What a worker needs for one record: its file, and every metadata field known before decoding."""
    labels = [rec.labels.get(n) for n in plan.label_names]
    meta = {"dataset": rec.dataset, "patient_id": rec.patient_id, "study_id": rec.study_id, "view": rec.view,
            "sex": rec.sex, "age": rec.age, "labels": dict(zip(plan.label_names, labels)), "split": split,
            "source_path": privacy.input_id(rec.source_path), "flags": rec.flags}  # private: salted pseudonym
    lbl = struct.pack(f"<{len(labels)}f", *(math.nan if v is None else float(v) for v in labels))
    pid = struct.pack("<q", plan.patient_index[rec.patient_id])
    return SampleTask(seq, rec.source_path, rec.kind, rec.key, meta, lbl, pid)


# ---- main side ---------------------------------------------------------------------------------------------
class SplitWriter:
    """Cuts one split's stream of samples into shards (deterministically, by the samples' own sizes)."""

    def __init__(self, out: Path, split: str, done: list[Segment], max_bytes: int, max_samples: int):
        self.out, self.split, self.max_bytes, self.max_samples = out, split, max_bytes, max_samples
        self.segments = list(done)
        self.pos = done[-1].plan_end if done else 0
        self.start = self.pos
        self.samples: list[EncodedSample] = []
        self.members_bytes = 0
        self.rejects: list[list[str]] = []

    def add(self, index: int, key: str, result: TaskResult) -> None:
        if result.sample is not None:
            size = len(result.sample.blob)
            if self.samples and (len(self.samples) >= self.max_samples
                                 or tar_archive_bytes(self.members_bytes + size) > self.max_bytes):
                self.flush(index)
            self.samples.append(result.sample)
            self.members_bytes += size
        else:  # [key, sha256, reason]: no path in OUT, even in resume state
            self.rejects.append([key, result.sha256 or "", result.reason])
        self.pos = index + 1

    def flush(self, plan_end: int) -> None:
        if not self.samples and not self.rejects:
            return
        shard = None
        if self.samples:
            n = sum(1 for s in self.segments if s.shard is not None)
            w = write_encoded_shard(self.out / self.split / SHARD_PATTERN.format(index=n), self.samples)
            shard = {"name": w.name, "num_samples": w.num_samples, "sha256": w.sha256, "num_bytes": w.num_bytes}
        seg = Segment(self.split, len(self.segments), self.start, plan_end, shard, self.rejects)
        save_segment(self.out, seg)
        self.segments.append(seg)
        self.start, self.samples, self.members_bytes, self.rejects = plan_end, [], 0, []


def _clean_partial_files(out: Path, done: dict[str, list[Segment]]) -> None:
    # Shards beyond the last verified segment (a killed run's leftovers) are rewritten; drop them now.
    for split in SPLITS:
        keep = {s.shard["name"] for s in done[split] if s.shard}
        keep |= {Path(n).with_suffix(INDEX_SUFFIX).name for n in keep}
        folder = out / split
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name not in keep:
                    p.unlink()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def run(a: argparse.Namespace) -> int:
    views = _check_args(a)
    try:
        policy = policy_from_args(a)
    except ValueError as e:
        raise BuildError(str(e)) from None
    if not a.root.is_dir():
        raise BuildError(f"{a.root}: --root is not a directory")
    if a.out.resolve().is_relative_to(a.root.resolve()):
        raise BuildError(f"{a.out}: --out must not be inside --root (its files would become inputs)")
    if a.labels_csv is not None and not a.labels_csv.is_file():
        raise BuildError(f"{a.labels_csv}: --labels-csv not found")
    privacy = Privacy(a)
    prepare_out(a.out, a.overwrite)
    src = read_source(a.source, a.root, SourceOptions(a.labels_csv, privacy.salt, a.dataset_name, a.workers, policy))
    if not src.has_official_split:
        a.split_mode = "hash"  # recorded as what was actually done
    options = options_json(a, privacy)
    options["views"] = sorted(views)
    try:
        plan = make_plan(src.dataset, src.label_names, src.records, src.rejects, views=views,
                         split_mode=a.split_mode, split_seed=a.split_seed,
                         shuffle_seed=a.shuffle_seed, val_frac=a.val_frac, test_frac=a.test_frac,
                         options_for_fingerprint=options)
    except ValueError as e:
        raise BuildError(str(e)) from None
    plan.filtered = src.filtered + plan.filtered  # header filters, then --views
    plan.num_inputs += len(src.filtered)
    old = read_plan_fingerprint(a.out)
    if old is not None and old != plan.fingerprint:
        raise BuildError(f"{a.out}: holds a partial ingest made with other arguments or inputs; "
                         "re-run with the same arguments or pass --overwrite")
    save_plan_fingerprint(a.out, plan.fingerprint)
    done = load_segments(a.out, {s: len(plan.order[s]) for s in SPLITS})
    _clean_partial_files(a.out, done)
    writers = {s: SplitWriter(a.out, s, done[s], a.shard_max_bytes, a.shard_max_samples) for s in SPLITS}
    todo = [(s, i, plan.order[s][i]) for s in SPLITS for i in range(writers[s].pos, len(plan.order[s]))]
    _process(a, plan, writers, todo, privacy)
    return _finish(a, plan, writers, privacy, src.notes)


def _process(a: argparse.Namespace, plan: Plan, writers: dict[str, SplitWriter], todo: list, privacy: Privacy) -> None:
    from tqdm import tqdm

    from ingest.progress import show_progress
    tasks = (sample_task(seq, r, split, plan, privacy) for seq, (split, _, r) in enumerate(todo))
    worker = SampleWorker(a.root, a.size, a.quality)
    pool = GuardedPool(worker, a.workers, a.file_timeout_s) if a.workers > 0 else None
    results = pool.imap(tasks) if pool is not None else map(worker, tasks)  # ordered: independent of worker count
    try:
        bar = tqdm(total=plan.num_planned, initial=plan.num_planned - len(todo), unit="img",
                   disable=not show_progress(not a.no_progress),
                   dynamic_ncols=True, desc="ingest")
        with bar:
            for (split, i, rec), result in zip(todo, results):
                w = writers[split]
                w.add(i, rec.key, result)
                if w.pos == len(plan.order[split]):
                    w.flush(w.pos)
                bar.update(1)
    finally:
        if pool is not None:
            pool.close()


def _finish(a: argparse.Namespace, plan: Plan, writers: dict[str, SplitWriter], privacy: Privacy,
            notes: dict) -> int:
    by_key = {r.key: r for s in SPLITS for r in plan.order[s]}
    # (raw path, reason, sha256); scan rejects never reached a worker: hash them here (they are few)
    raw = [(r.source_path, r.reason, _file_sha256(a.root / r.source_path) if privacy.private else "")
           for r in plan.scan_rejects]
    splits = {}
    for s in SPLITS:
        segs = writers[s].segments
        rejected_keys = {k for seg in segs for k, _, _ in seg.rejects}
        raw += [(by_key[k].source_path, reason, sha) for seg in segs for k, sha, reason in seg.rejects]
        shards = [seg.shard for seg in segs if seg.shard is not None]
        patients = {r.patient_id for r in plan.order[s] if r.key not in rejected_keys}
        splits[s] = {"num_samples": sum(x["num_samples"] for x in shards), "num_patients": len(patients),
                     "shards": shards}
    rejects = [privacy.row(p, reason, sha) for p, reason, sha in raw]
    filtered = [{k: v for k, v in privacy.row(f.source_path, f.reason).items() if k != "sha256"} for f in plan.filtered]
    extra = dict(notes)
    if privacy.private:
        extra["pseudonymisation"] = {
            "method": "HMAC-SHA256(salt, identifier or relative path), first 64 bits, hex",
            "identifiers": "patient, study and input paths (input_id); the salt is kept outside OUT"}
        write_private_log(privacy.log, [(privacy.input_id(p), sha, "rejected", reason, p) for p, reason, sha in raw]
                          + [(privacy.input_id(f.source_path), "", "filtered", f.reason, f.source_path)
                             for f in plan.filtered])
    manifest = write_outputs(a.out, dataset=plan.dataset, label_names=plan.label_names, patients=plan.patients,
                             splits=splits, rejects=rejects, filtered=filtered, num_inputs=plan.num_inputs,
                             options=options_json(a, privacy), extra=extra)
    shutil.rmtree(a.out / STATE_DIR, ignore_errors=True)
    summary_table(manifest)
    if privacy.private:
        made = " (created now: keep it, it maps patients to pseudonyms)" if privacy.salt_created else ""
        print(f"pseudonym salt: {privacy.salt_file}{made}\nraw paths of rejected / filtered inputs (private, not "
              f"for sharing): {privacy.log}")
    if manifest["counts"]["written"] == 0:
        print(f"ingest build-shards: no sample written from {a.root} (see {a.out / REJECTS_NAME})", file=sys.stderr)
        return 1
    if raw:
        print(f"{len(raw):,} inputs rejected: see {a.out / REJECTS_NAME}", file=sys.stderr)
        if a.strict:
            print(f"ingest build-shards: --strict and {len(raw)} rejects", file=sys.stderr)
            return 1
    return 0


def options_json(a: argparse.Namespace, privacy: Privacy) -> dict:
    """The options that shaped the output, as recorded in the manifest (not --workers: it changes nothing)."""
    out = {k: getattr(a, k) for k in OUTPUT_OPTIONS}
    if a.source == "dicom":
        out.update({k: getattr(a, k) for k in POLICY_OPTIONS})
    if a.labels_csv is None:
        out["labels_csv"] = None
    elif privacy.private:  # the CSV's name may identify; its hash still pins it
        out["labels_csv"] = "sha256:" + _file_sha256(a.labels_csv)
    else:
        out["labels_csv"] = a.labels_csv.name
    return out


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.salt_file, a.private_log = getattr(a, "salt_file", None), getattr(a, "private_log", None)
    try:
        return run(a)
    except (BuildError, SourceError) as e:
        print(f"ingest build-shards: {e}", file=sys.stderr)
        return 2
