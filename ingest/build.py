"""`ingest build-shards`: read a source's records, plan splits and shard order, decode/resize/encode in worker
processes (results consumed in plan order), write size-targeted shards with DALI indexes, `manifest.json` last.

Resumable: each finished shard leaves a segment file (ingest/state.py); a re-run with the same arguments skips
verified segments and produces byte-identical output.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import secrets
import shutil
import struct
import sys
from pathlib import Path

from ingest.manifest import FILTERED_NAME, PATIENTS_NAME, summary_table, write_outputs
from ingest.plan import Plan, make_plan
from ingest.preprocess import ImageReject, Processed, process_file
from ingest.records import Record, parse_views_option
from ingest.schema import INDEX_SUFFIX, MANIFEST_NAME, REJECTS_NAME, SHARD_PATTERN, SPLITS, VIEWS_CACHE_DIR
from ingest.shards import EncodedSample, encode_sample, tar_archive_bytes, write_encoded_shard
from ingest.sources import SOURCES, SourceError, SourceOptions, read_source
from ingest.state import STATE_DIR, Segment, load_segments, read_plan_fingerprint, save_plan_fingerprint, save_segment

SALT_FILE = "pseudonym-salt.txt"
OWN_ENTRIES = {*SPLITS, MANIFEST_NAME, REJECTS_NAME, FILTERED_NAME, PATIENTS_NAME, STATE_DIR, SALT_FILE,
               MANIFEST_NAME + ".tmp", PATIENTS_NAME + ".tmp", REJECTS_NAME + ".tmp", FILTERED_NAME + ".tmp",
               VIEWS_CACHE_DIR}
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
  dicom     every file under ROOT; PatientID / StudyInstanceUID replaced by salted hashes
  folder    ROOT/<class>/**/image (one-hot labels over the class folders) or --labels-csv
output: OUT/{train,val,test}/shard-NNNNNN.tar + .idx, patients.json, rejects.tsv, filtered.tsv, manifest.json
(written last). inputs = written + rejected + filtered, always. A killed run continues when started again
with the same arguments, and the result is byte-identical to an uninterrupted run."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest build-shards", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("--source", required=True, choices=sorted(SOURCES), help="dataset layout under --root")
    p.add_argument("--root", required=True, type=Path, help="dataset folder (CSV paths are taken relative to it)")
    p.add_argument("--out", required=True, type=Path, help="output folder: SPLIT/shard-NNNNNN.tar + .idx, manifest.json")
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
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decoding processes (0: in-process)")
    p.add_argument("--labels-csv", type=Path, help="folder / dicom: CSV with path [, patient, study, view, sex, age] "
                                                   "and a 'label' column or one column per label")
    p.add_argument("--dataset-name", help="folder / dicom: value of the 'dataset' field and key prefix")
    p.add_argument("--pseudonym-salt", default=argparse.SUPPRESS,
                   help="dicom: salt (or @FILE holding it) of the PatientID / StudyInstanceUID hash (default: a random salt kept in "
                        f"OUT/{SALT_FILE}; keep it private, never ship it)")
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
    if a.dataset_name is not None and not all(c.isalnum() or c in "-_" for c in a.dataset_name):
        raise BuildError(f"--dataset-name {a.dataset_name!r}: letters, digits, '-' and '_' only")
    try:
        return parse_views_option(a.views)
    except ValueError as e:
        raise BuildError(str(e)) from None


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse finished or foreign output; with --overwrite remove only what ingest writes (the salt stays)."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: --out exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES)
    if foreign:
        raise BuildError(f"{out}: not an ingest output folder (contains {', '.join(foreign[:3])}); choose an empty --out")
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        raise BuildError(f"{out}: holds a finished ingest (manifest.json); pass --overwrite to rebuild it")
    if overwrite:
        for name in OWN_ENTRIES - {SALT_FILE}:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def pseudonym_salt(a: argparse.Namespace) -> bytes:
    if a.pseudonym_salt:
        if a.pseudonym_salt.startswith("@"):  # @FILE keeps the salt out of shell history and `ps`
            try:
                return Path(a.pseudonym_salt[1:]).read_text().strip().encode()
            except OSError as e:
                raise BuildError(f"{a.pseudonym_salt[1:]}: cannot read the pseudonym salt file ({e.strerror})") from None
        return a.pseudonym_salt.encode()
    path = a.out / SALT_FILE
    if path.is_file():
        return path.read_text().strip().encode()
    salt = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
    return salt.encode()


# ---- worker side: decode, resize, encode and pre-build the sample's tar blocks (keeps the writer light) ----
_WORKER: dict = {}


def _init_worker(root: str, size: int, quality: int) -> None:
    _WORKER.update(root=Path(root), size=size, quality=quality)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def sample_task(rec: Record, split: str, plan: Plan) -> tuple:
    """What a worker needs for one record: its file, and every metadata field known before decoding."""
    labels = [rec.labels.get(n) for n in plan.label_names]
    meta = {"dataset": rec.dataset, "patient_id": rec.patient_id, "study_id": rec.study_id, "view": rec.view,
            "sex": rec.sex, "age": rec.age, "labels": dict(zip(plan.label_names, labels)), "split": split,
            "source_path": rec.shard_path or rec.source_path, "flags": rec.flags}
    lbl = struct.pack(f"<{len(labels)}f", *(math.nan if v is None else float(v) for v in labels))
    pid = struct.pack("<q", plan.patient_index[rec.patient_id])
    return rec.source_path, rec.kind, rec.key, meta, lbl, pid


def make_sample(task: tuple, p: Processed) -> dict[str, bytes]:
    _, _, key, meta, lbl, pid = task
    meta = {**meta, "source_sha256": p.source_sha256, "original_width": p.original_width,
            "original_height": p.original_height, "original_bit_depth": p.original_bit_depth,
            "photometric_interpretation": p.photometric_interpretation, "preprocessing": p.steps,
            "flags": {**meta["flags"], **p.flags}}
    return {"__key__": key, "jpg": p.jpeg, "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
            "lbl": lbl, "pid": pid}


def _work(task: tuple) -> tuple[bool, EncodedSample | str]:
    rel, kind = task[0], task[1]
    try:
        p = process_file(_WORKER["root"] / rel, kind, _WORKER["size"], _WORKER["quality"])
    except ImageReject as e:
        return False, str(e)
    except Exception as e:  # bad input must never stop the run; the reason names the failure
        return False, f"decoding failed ({type(e).__name__}: {e})"
    return True, encode_sample(make_sample(task, p))


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

    def add(self, index: int, sample: EncodedSample | None, reject: tuple[str, str, str] | None) -> None:
        if sample is not None:
            size = len(sample.blob)
            if self.samples and (len(self.samples) >= self.max_samples
                                 or tar_archive_bytes(self.members_bytes + size) > self.max_bytes):
                self.flush(index)
            self.samples.append(sample)
            self.members_bytes += size
        else:
            self.rejects.append(list(reject))
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


def run(a: argparse.Namespace) -> int:
    views = _check_args(a)
    if not a.root.is_dir():
        raise BuildError(f"{a.root}: --root is not a directory")
    if a.out.resolve().is_relative_to(a.root.resolve()):
        raise BuildError(f"{a.out}: --out must not be inside --root (its files would become inputs)")
    if a.labels_csv is not None and not a.labels_csv.is_file():
        raise BuildError(f"{a.labels_csv}: --labels-csv not found")
    prepare_out(a.out, a.overwrite)
    salt = pseudonym_salt(a) if a.source == "dicom" else b""
    src = read_source(a.source, a.root, SourceOptions(a.labels_csv, salt, a.dataset_name, a.workers))
    if not src.has_official_split:
        a.split_mode = "hash"  # recorded as what was actually done
    options = {k: getattr(a, k) for k in OUTPUT_OPTIONS}
    options["views"] = sorted(views)
    if a.labels_csv is not None:
        options["labels_csv"] = a.labels_csv.name
    try:
        plan = make_plan(src.dataset, src.label_names, src.records, src.rejects, views=views,
                         split_mode=a.split_mode, split_seed=a.split_seed,
                         shuffle_seed=a.shuffle_seed, val_frac=a.val_frac, test_frac=a.test_frac,
                         options_for_fingerprint=options)
    except ValueError as e:
        raise BuildError(str(e)) from None
    old = read_plan_fingerprint(a.out)
    if old is not None and old != plan.fingerprint:
        raise BuildError(f"{a.out}: holds a partial ingest made with other arguments or inputs; "
                         "re-run with the same arguments or pass --overwrite")
    save_plan_fingerprint(a.out, plan.fingerprint)
    done = load_segments(a.out, {s: len(plan.order[s]) for s in SPLITS})
    _clean_partial_files(a.out, done)
    writers = {s: SplitWriter(a.out, s, done[s], a.shard_max_bytes, a.shard_max_samples) for s in SPLITS}
    todo = [(s, i, plan.order[s][i]) for s in SPLITS for i in range(writers[s].pos, len(plan.order[s]))]
    _process(a, plan, writers, todo)
    return _finish(a, plan, writers)


def _process(a: argparse.Namespace, plan: Plan, writers: dict[str, SplitWriter], todo: list) -> None:
    from tqdm import tqdm
    tasks = (sample_task(r, split, plan) for split, _, r in todo)
    init = (str(a.root), a.size, a.quality)
    pool = None
    if a.workers > 0:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(a.workers, initializer=_init_worker, initargs=init)
        results = pool.imap(_work, tasks, chunksize=16)  # ordered: output independent of worker count
    else:
        _init_worker(*init)
        results = map(_work, tasks)
    try:
        bar = tqdm(total=plan.num_planned, initial=plan.num_planned - len(todo), unit="img", disable=a.no_progress,
                   dynamic_ncols=True, desc="ingest")
        with bar:
            for (split, i, rec), (ok, payload) in zip(todo, results):
                w = writers[split]
                if ok:
                    w.add(i, payload, None)
                else:
                    w.add(i, None, (rec.key, rec.source_path, payload))
                if w.pos == len(plan.order[split]):
                    w.flush(w.pos)
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _finish(a: argparse.Namespace, plan: Plan, writers: dict[str, SplitWriter]) -> int:
    splits, rejects = {}, [(r.source_path, r.reason) for r in plan.scan_rejects]
    for s in SPLITS:
        segs = writers[s].segments
        rejected_keys = {k for seg in segs for k, _, _ in seg.rejects}
        rejects += [(p, reason) for seg in segs for _, p, reason in seg.rejects]
        shards = [seg.shard for seg in segs if seg.shard is not None]
        patients = {r.patient_id for r in plan.order[s] if r.key not in rejected_keys}
        splits[s] = {"num_samples": sum(x["num_samples"] for x in shards), "num_patients": len(patients),
                     "shards": shards}
    extra = {}
    if a.source == "dicom":
        extra["pseudonymisation"] = {
            "method": "HMAC-SHA256(salt, PatientID | StudyInstanceUID), first 64 bits, hex",
            "salt": "given with --pseudonym-salt" if a.pseudonym_salt else f"random, kept in {SALT_FILE} (private)"}
    manifest = write_outputs(a.out, dataset=plan.dataset, label_names=plan.label_names, patients=plan.patients,
                             splits=splits, rejects=rejects, filtered=[(f.source_path, f.reason) for f in plan.filtered],
                             num_inputs=plan.num_inputs, options=options_json(a), extra=extra)
    shutil.rmtree(a.out / STATE_DIR, ignore_errors=True)
    summary_table(manifest)
    if manifest["counts"]["written"] == 0:
        print(f"ingest build-shards: no sample written from {a.root} (see {a.out / REJECTS_NAME})", file=sys.stderr)
        return 1
    if rejects:
        print(f"{len(rejects):,} inputs rejected: see {a.out / REJECTS_NAME}", file=sys.stderr)
        if a.strict:
            print(f"ingest build-shards: --strict and {len(rejects)} rejects", file=sys.stderr)
            return 1
    return 0


def options_json(a: argparse.Namespace) -> dict:
    """The options that shaped the output, as recorded in the manifest (not --workers: it changes nothing)."""
    out = {k: getattr(a, k) for k in OUTPUT_OPTIONS}
    out["views"] = a.views
    out["labels_csv"] = a.labels_csv.name if a.labels_csv is not None else None
    return out


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.pseudonym_salt = getattr(a, "pseudonym_salt", None)
    try:
        return run(a)
    except (BuildError, SourceError) as e:
        print(f"ingest build-shards: {e}", file=sys.stderr)
        return 2
