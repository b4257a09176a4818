"""`ingest build-shards`: read a source's records, plan splits and shard order, decode/resize/encode in worker
processes (results consumed in plan order), write size-targeted shards with DALI indexes, `manifest.json` last.

Resumable: each finished shard leaves a segment file (ingest/state.py); a re-run with the same arguments skips
verified segments and produces byte-identical output. With --part K/N it encodes only part K's slice of the
plan into OUT/.ingest-parts/ (no manifest); `ingest merge OUT` then writes what a single run writes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ingest.dicom_filters import POLICY_OPTIONS, DicomPolicy, add_policy_options, policy_from_args
from ingest.files import sha256_file, temp_target
from ingest.manifest import FILTERED_NAME, PATIENTS_NAME, reason_lines, summary_table, write_outputs
from ingest.plan import Plan, make_plan
from ingest.pseudonym import (PrivacyError, check_outside, default_private_log, default_salt_file,
                              load_or_create_salt, pseudonymise, write_private_log)
from ingest.records import Record, Reject, parse_views_option
from ingest.schema import INDEX_SUFFIX, MANIFEST_NAME, REJECTS_NAME, SHARD_PATTERN, SPLITS, VIEWS_CACHE_DIR
from ingest.shards import EncodedSample, tar_archive_bytes, write_encoded_shard
from ingest.sources import SOURCES, SourceError, SourceOptions, read_source
from ingest.state import (PART_ARGS_FILE, PART_DONE_FILE, PARTS_DIR, STATE_DIR, Segment, clear_failed, failed_run,
                          keep_until_first_reject, load_segments, mark_failed, mark_part_complete, part_dir,
                          read_plan_fingerprint, save_plan_fingerprint, save_segment)
from ingest.workers import GuardedPool, SampleTask, SampleWorker, TaskResult

LEGACY_SALT_FILE = "pseudonym-salt.txt"  # older versions kept the salt in OUT: refused now
OWN_FILES = {MANIFEST_NAME, REJECTS_NAME, FILTERED_NAME, PATIENTS_NAME}
OWN_ENTRIES = {*SPLITS, *OWN_FILES, STATE_DIR, VIEWS_CACHE_DIR, PARTS_DIR}
# Sources whose paths, file names and ids may identify a patient: OUT shows only salted pseudonyms of them.
PRIVATE_SOURCES = ("dicom", "folder")
# Options that change the output bytes (recorded in the manifest and the resume fingerprint); --workers does not.
OUTPUT_OPTIONS = ("source", "size", "quality", "views", "split_mode", "split_seed", "shuffle_seed", "val_frac",
                  "test_frac", "shard_max_bytes", "shard_max_samples", "dataset_name")


class BuildError(RuntimeError):
    """Stops the run with a one-line reason (exit 2)."""


def _own_entry(name: str) -> bool:
    """One of ingest's entries in OUT, or the temp file a killed write of one of its files left."""
    return name in OWN_ENTRIES or temp_target(name) in OWN_FILES


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
  chexpert  ROOT/train.csv, valid.csv (CheXpert v1.0 or v1.0-small, or one folder down); official split:
            valid.csv -> test, train.csv -> train, with --val-frac of its patients hashed into val
  nih       ROOT/Data_Entry_2017*.csv, PNGs in ROOT/, ROOT/images/ or ROOT/images_NNN/images/;
            train_val_list.txt + test_list.txt honoured when present
  mimic     ROOT/files/pXX/pNNN/sNNN/*.jpg + mimic-cxr-2.0.0-{metadata,split,chexpert}.csv[.gz]
  dicom     every file under ROOT (header filters: --modalities, --body-parts, --frames, ...; see
            `ingest scan` for a dry run); PatientID / StudyInstanceUID replaced by salted hashes
  folder    ROOT/<class>/**/image (one-hot labels over the class folders) or --labels-csv; symlinks followed
            (loops rejected); a tree with CheXpert / NIH / MIMIC metadata is refused unless --force-folder
output: OUT/{train,val,test}/shard-NNNNNN.tar + .idx, patients.json, rejects.tsv, filtered.tsv, manifest.json
(written last). inputs = written + rejected + filtered, always. A killed run continues when started again
with the same arguments, and the result is byte-identical to an uninterrupted run. A run that writes no
sample, or fails --strict, writes no manifest: the same command runs it again without --overwrite.
privacy (dicom, folder): OUT names inputs only by salted pseudonyms (input_id) and sha256; the salt
(--salt-file) and the map back to raw paths (--private-log) are kept outside OUT, mode 600.
cluster: --part K/N (K = 0..N-1, e.g. one Slurm array task each) encodes part K's slice of the same plan into
OUT/.ingest-parts/ and writes no manifest; a killed part resumes when rerun. Once all N are complete,
`ingest merge OUT` writes the files above, byte-identical to one run without --part."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest build-shards", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("--source", required=True, choices=sorted(SOURCES), help="dataset layout under --root")
    p.add_argument("--root", required=True, type=Path, help="dataset folder (CSV paths are taken relative to it)")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: SPLIT/shard-NNNNNN.tar + .idx, manifest.json; or s3://bucket/prefix: built "
                        "in --staging DIR (default ~/.cache/cxr-ssl/ingest-staging/BUCKET/PREFIX), then uploaded, "
                        "manifest last (--s3-endpoint URL, or AWS_ENDPOINT_URL; needs `pip install cxr-ssl[s3]`)")
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
    p.add_argument("--force-folder", action="store_true",
                   help="folder: pack ROOT as class folders even when it holds CheXpert, NIH or MIMIC metadata "
                        "(refused by default: that source reads the real labels, views and patients)")
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
    p.add_argument("--strict", action="store_true",
                   help="when any input is rejected: exit 1 and write no manifest (rejects.tsv says why; the rerun "
                        "resumes up to the first rejected input)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished (or differently configured) output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--part", type=parse_part, metavar="K/N",
                   help="encode only part K (0-based) of N of the plan into OUT/.ingest-parts/; no manifest until "
                        "`ingest merge OUT` (the same arguments, with K running over 0..N-1)")
    return p


def parse_part(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    try:
        part = (int(k), int(n))
    except ValueError:
        part = None
    if not sep or part is None or not 0 <= part[0] < part[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K < N (e.g. 0/8)")
    return part


@dataclass(frozen=True)
class BuildOptions:
    """The resolved, checked options of one build (named as the argparse dests, so OUTPUT_OPTIONS reads them
    alike); changed only by ``dataclasses.replace``, e.g. once the source has said where its root is."""
    source: str
    root: Path
    out: Path
    size: int
    quality: int
    views: str                          # as given (recorded in the manifest)
    selected_views: frozenset[str]      # what --views selects
    split_mode: str
    split_seed: int
    val_frac: float
    test_frac: float
    shuffle_seed: int
    shard_max_bytes: int
    shard_max_samples: int
    workers: int
    labels_csv: Path | None
    force_folder: bool
    dataset_name: str | None
    salt_file: Path | None              # None: the per-user default
    private_log: Path | None            # None: the per-OUT default
    policy: DicomPolicy
    policy_args: dict                   # the dicom filter options as given (recorded in the manifest)
    file_timeout_s: float
    strict: bool
    overwrite: bool
    no_progress: bool
    part: tuple[int, int] | None        # (K, N) with --part, else None

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> BuildOptions:
        """BuildError with a one-line reason for a bad value; ``a`` is left as parsed."""
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
            selected = parse_views_option(a.views)
            policy = policy_from_args(a)
        except ValueError as e:
            raise BuildError(str(e)) from None
        return cls(a.source, a.root, a.out, a.size, a.quality, a.views, selected, a.split_mode, a.split_seed,
                   a.val_frac, a.test_frac, a.shuffle_seed, a.shard_max_bytes, a.shard_max_samples, a.workers,
                   a.labels_csv, a.force_folder, a.dataset_name, getattr(a, "salt_file", None),
                   getattr(a, "private_log", None), policy, {k: getattr(a, k) for k in POLICY_OPTIONS},
                   a.file_timeout_s, a.strict, a.overwrite, a.no_progress, getattr(a, "part", None))


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse finished or foreign output before anything is written (a failed check leaves OUT as it was)."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: --out exists and is not a folder")
    if not out.is_dir():
        return
    if (out / LEGACY_SALT_FILE).exists():
        raise BuildError(f"{out / LEGACY_SALT_FILE}: a pseudonym salt inside OUT would ship with the shards; move it "
                         f"out of OUT and pass it with --salt-file")
    foreign = sorted(p.name for p in out.iterdir() if not _own_entry(p.name))
    if foreign:
        raise BuildError(f"{out}: not an ingest output folder (contains {', '.join(foreign[:3])}); "
                         "choose an empty --out")
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        raise BuildError(f"{out}: holds a finished ingest (manifest.json); pass --overwrite to rebuild it")


def prepare_out(out: Path, overwrite: bool) -> None:
    """Once every check passed: create OUT; with --overwrite remove only what ingest writes. Without it, the
    final files of an unfinished run (written again at the end) go, and its resume state stays."""
    check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    names = OWN_ENTRIES if overwrite else OWN_ENTRIES - {*SPLITS, STATE_DIR, VIEWS_CACHE_DIR, PARTS_DIR}
    names |= {p.name for p in out.iterdir() if temp_target(p.name) in OWN_FILES}
    for name in names:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class Privacy:
    """How OUT names the inputs: raw relative paths (public datasets) or salted pseudonyms + a private log."""

    def __init__(self, o: BuildOptions):
        self.private = o.source in PRIVATE_SOURCES
        self.salt, self.salt_created, self.log = b"", False, None
        if not self.private:
            return
        salt_file = o.salt_file or default_salt_file()
        self.log = o.private_log or default_private_log(o.out)
        try:
            check_outside(salt_file, {"--out": o.out, "--root": o.root}, "--salt-file")
            check_outside(self.log, {"--out": o.out, "--root": o.root}, "--private-log")
            self.salt, self.salt_created = load_or_create_salt(salt_file)
        except PrivacyError as e:
            raise BuildError(str(e)) from None
        self.salt_file = salt_file

    def input_id(self, rel: str) -> str:
        return pseudonymise(rel, self.salt, "f") if self.private else rel

    def reject_row(self, r: Reject) -> dict:
        """A line of rejects.tsv (and the manifest's rejects)."""
        if not self.private:
            return {"source_path": r.source_path, "reason": r.reason}
        return {"input_id": self.input_id(r.source_path), "sha256": r.sha256, "reason": r.reason}

    def filtered_row(self, r: Reject) -> dict:
        """A line of filtered.tsv: no sha256 (a filtered input's bytes are never read)."""
        if not self.private:
            return {"source_path": r.source_path, "reason": r.reason}
        return {"input_id": self.input_id(r.source_path), "reason": r.reason}

    def log_row(self, r: Reject, status: str) -> tuple[str, str, str, str, str]:
        """A line of the private log (outside OUT): the pseudonym's way back to the raw path."""
        return self.input_id(r.source_path), r.sha256, status, r.reason, r.source_path


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
    """Cuts one split's stream of samples into shards (deterministically, by the samples' own sizes), from
    ``start`` in the split's plan (0, or where a part's slice begins) or from the end of the segments done."""

    def __init__(self, out: Path, split: str, done: list[Segment], max_bytes: int, max_samples: int,
                 start: int = 0):
        self.out, self.split, self.max_bytes, self.max_samples = out, split, max_bytes, max_samples
        self.segments = list(done)
        self.pos = done[-1].plan_end if done else start
        self.start = self.pos
        self.samples: list[EncodedSample] = []
        self.members_bytes = 0
        self.rejects: list[Reject] = []

    def add(self, index: int, result: TaskResult) -> None:
        if result.sample is not None:
            size = len(result.sample.blob)
            if self.samples and (len(self.samples) >= self.max_samples
                                 or tar_archive_bytes(self.members_bytes + size) > self.max_bytes):
                self.flush(index)
            self.samples.append(result.sample)
            self.members_bytes += size
        else:
            self.rejects.append(result.reject)
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


def clean_partial_files(out: Path, done: dict[str, list[Segment]]) -> None:
    """Shards beyond the last verified segment (a killed run's leftovers) are rewritten; drop them now."""
    for split in SPLITS:
        keep = {s.shard["name"] for s in done[split] if s.shard}
        keep |= {Path(n).with_suffix(INDEX_SUFFIX).name for n in keep}
        folder = out / split
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name not in keep:
                    p.unlink()


def _file_sha256(path: Path) -> str:
    """The file's sha256, or "" when it cannot be read (a reject's input may be gone or unreadable)."""
    try:
        return sha256_file(path)
    except OSError:
        return ""


@dataclass
class PlannedRun:
    """What every kind of run (whole, part, merge) derives from the options and the source, identically."""
    options: BuildOptions       # with the root the source found and the split mode actually used
    privacy: Privacy
    plan: Plan
    notes: dict                 # the source's notes, recorded in the manifest


def plan_run(o: BuildOptions) -> PlannedRun:
    """Check the options against the file system, read the source and make the plan; nothing is written
    except a new salt file. BuildError / SourceError with a one-line reason."""
    if not o.root.is_dir():
        raise BuildError(f"{o.root}: --root is not a directory")
    if o.out.resolve().is_relative_to(o.root.resolve()):
        raise BuildError(f"{o.out}: --out must not be inside --root (its files would become inputs)")
    if o.labels_csv is not None and not o.labels_csv.is_file():
        raise BuildError(f"{o.labels_csv}: --labels-csv not found")
    if o.force_folder and o.source != "folder":
        raise BuildError(f"--force-folder applies to --source folder only, not {o.source}")
    if o.part is not None and (o.out / MANIFEST_NAME).is_file():
        raise BuildError(f"{o.out}: holds a finished ingest (manifest.json); parts go to a new or unfinished --out")
    check_out(o.out, o.overwrite and o.part is None)
    privacy = Privacy(o)
    src = read_source(o.source, o.root, SourceOptions(o.labels_csv, privacy.salt, o.dataset_name, o.workers,
                                                      o.policy, force_folder=o.force_folder))
    if src.root is not None:
        print(f"ingest build-shards: using {src.root} as --root (the {src.dataset} folder found in {o.root})")
        o = replace(o, root=src.root)
    if not src.has_official_split:
        o = replace(o, split_mode="hash")  # recorded as what was actually done
    options = options_json(o, privacy)
    options["views"] = sorted(o.selected_views)
    try:
        plan = make_plan(src.dataset, src.label_names, src.records, src.rejects, views=o.selected_views,
                         split_mode=o.split_mode, split_seed=o.split_seed,
                         shuffle_seed=o.shuffle_seed, val_frac=o.val_frac, test_frac=o.test_frac,
                         options_for_fingerprint=options)
    except ValueError as e:
        raise BuildError(str(e)) from None
    plan.filtered = src.filtered + plan.filtered  # header filters, then --views
    plan.num_inputs += len(src.filtered)
    return PlannedRun(o, privacy, plan, src.notes)


def start_resumable(out: Path, plan: Plan, overwrite: bool, what: str = "ingest") -> None:
    """Refuse the partial state of another plan unless asked (or unless that run failed); then create or clear
    OUT and record the plan, so a killed run resumes from the segments it finished."""
    old = None if overwrite else read_plan_fingerprint(out)
    restart = old is not None and old != plan.fingerprint
    if restart and not failed_run(out):  # a killed run's hours of work are not dropped without being asked
        raise BuildError(f"{out}: holds a partial {what} made with other arguments or inputs; "
                         "re-run with the same arguments or pass --overwrite")
    # Every check passed: only now is OUT created or cleared. A failure from here on leaves resume state only.
    if restart:
        print(f"ingest build-shards: {out}: the inputs or arguments changed since the failed run there; "
              "starting over")
    prepare_out(out, overwrite or restart)
    save_plan_fingerprint(out, plan.fingerprint)
    clear_failed(out)


def run(o: BuildOptions, argv: list[str]) -> int:
    r = plan_run(o)
    o, plan = r.options, r.plan
    if o.part is not None:
        return run_part(r, argv)
    if (o.out / PARTS_DIR).exists() and not o.overwrite:
        raise BuildError(f"{o.out}: holds the parts of a partitioned ingest (--part); finish it with `ingest merge "
                         f"{o.out}`, or pass --overwrite to replace it with a single run")
    start_resumable(o.out, plan, o.overwrite)
    done = load_segments(o.out, plan.order)
    clean_partial_files(o.out, done)
    writers = {s: SplitWriter(o.out, s, done[s], o.shard_max_bytes, o.shard_max_samples) for s in SPLITS}
    todo = [(s, i, plan.order[s][i]) for s in SPLITS for i in range(writers[s].pos, len(plan.order[s]))]
    write_results(o, plan, writers, todo, encode(o, plan, todo, r.privacy), plan.num_planned)
    return finish(r, writers)


def run_part(r: PlannedRun, argv: list[str]) -> int:
    """Part K of N: the writers of a whole run over part K's slice of the plan, in the part's own folder; the
    slice's segments, verified and complete, are all the merge needs."""
    o, plan = r.options, r.plan
    k, n = o.part
    folder = part_dir(o.out, k, n)
    start_resumable(folder, plan, o.overwrite, what=f"part {k}/{n}")
    argv = [x for i, x in enumerate(argv) if x != "--part" and (i == 0 or argv[i - 1] != "--part")
            and not x.startswith("--part=")]
    (folder / STATE_DIR / PART_DONE_FILE).unlink(missing_ok=True)  # complete again only once this run is
    (folder / STATE_DIR / PART_ARGS_FILE).write_text(json.dumps({"argv": argv, "cwd": os.getcwd()}) + "\n")
    ranges = plan.part_ranges(k, n)
    done = load_segments(folder, plan.order, ranges)
    clean_partial_files(folder, done)
    writers = {s: SplitWriter(folder, s, done[s], o.shard_max_bytes, o.shard_max_samples, ranges[s][0])
               for s in SPLITS}
    todo = [(s, i, plan.order[s][i]) for s in SPLITS for i in range(writers[s].pos, ranges[s][1])]
    count = sum(e - b for b, e in ranges.values())
    write_results(o, plan, writers, todo, encode(o, plan, todo, r.privacy), count,
                  {s: e for s, (_, e) in ranges.items()})
    mark_part_complete(folder, plan.fingerprint, k, n)
    print(f"ingest build-shards: part {k}/{n} complete ({count:,} of {plan.num_planned:,} planned inputs) in "
          f"{folder}; `ingest merge {o.out}` once all {n} parts are complete")
    return 0


def encode(o: BuildOptions, plan: Plan, todo: list, privacy: Privacy) -> Iterator[TaskResult]:
    """One result per ``todo`` entry, in order (independent of the worker count)."""
    tasks = (sample_task(seq, r, split, plan, privacy) for seq, (split, _, r) in enumerate(todo))
    worker = SampleWorker(o.root, o.size, o.quality)
    if o.workers == 0:
        yield from map(worker, tasks)
        return
    pool = GuardedPool(worker, o.workers, o.file_timeout_s)
    try:
        yield from pool.imap(tasks)
    finally:
        pool.close()


def write_results(o: BuildOptions, plan: Plan, writers: dict[str, SplitWriter], todo: list,
                  results: Iterator[TaskResult], total: int, ends: dict[str, int] | None = None) -> None:
    """Feed each split's writer its results; a split's last segment is cut at its end (default: the plan's).
    ``total`` counts the inputs of the whole job (the progress bar starts at what earlier runs did)."""
    from tqdm import tqdm

    from ingest.progress import show_progress
    ends = ends or {s: len(plan.order[s]) for s in SPLITS}
    try:
        with tqdm(total=total, initial=total - len(todo), unit="img", disable=not show_progress(not o.no_progress),
                  dynamic_ncols=True, desc="ingest") as bar:
            for (split, i, _), result in zip(todo, results):
                w = writers[split]
                w.add(i, result)
                if w.pos == ends[split]:
                    w.flush(w.pos)
                bar.update(1)
    finally:
        getattr(results, "close", lambda: None)()  # stops the decode processes, also on an interrupt


def finish(r: PlannedRun, writers: dict[str, SplitWriter]) -> int:
    """The final files from the finished segments of every split: rejects.tsv, filtered.tsv, the private log,
    and unless the run failed, patients.json and manifest.json (last)."""
    o, plan, privacy = r.options, r.plan, r.privacy
    # scan rejects never reached a worker: hash them here (they are few)
    rejected = [replace(x, sha256=_file_sha256(o.root / x.source_path) if privacy.private else "")
                for x in plan.scan_rejects]
    splits = {}
    for s in SPLITS:
        segs = writers[s].segments
        split_rejects = [x for seg in segs for x in seg.rejects]
        rejected_keys = {x.key for x in split_rejects}
        rejected += split_rejects
        shards = [seg.shard for seg in segs if seg.shard is not None]
        patients = {rec.patient_id for rec in plan.order[s] if rec.key not in rejected_keys}
        splits[s] = {"num_samples": sum(x["num_samples"] for x in shards), "num_patients": len(patients),
                     "shards": shards}
    rejects = [privacy.reject_row(x) for x in rejected]
    filtered = [privacy.filtered_row(f) for f in plan.filtered]
    extra = dict(r.notes)
    written = sum(sp["num_samples"] for sp in splits.values())
    finished = written > 0 and not (o.strict and rejected)  # a failed run leaves no manifest that looks finished
    if privacy.private:
        extra["pseudonymisation"] = {
            "method": "HMAC-SHA256(salt, identifier or relative path), first 64 bits, hex",
            "identifiers": "patient, study and input paths (input_id); the salt is kept outside OUT"}
        write_private_log(privacy.log, [privacy.log_row(x, "rejected") for x in rejected]
                          + [privacy.log_row(f, "filtered") for f in plan.filtered])
    manifest = write_outputs(o.out, dataset=plan.dataset, label_names=plan.label_names, patients=plan.patients,
                             splits=splits, rejects=rejects, filtered=filtered, num_inputs=plan.num_inputs,
                             options=options_json(o, privacy), extra=extra, private=privacy.private,
                             finished=finished)
    if finished:
        shutil.rmtree(o.out / STATE_DIR, ignore_errors=True)
    else:  # no manifest: what stays is resumable (segments before the first reject) or removed
        clean_partial_files(o.out, keep_until_first_reject(o.out, {s: writers[s].segments for s in SPLITS}))
        mark_failed(o.out, "no sample written" if not written else "--strict and rejects")
    summary_table(manifest)
    if privacy.private:
        made = " (created now: keep it, it maps patients to pseudonyms)" if privacy.salt_created else ""
        print(f"pseudonym salt: {privacy.salt_file}{made}\nraw paths of rejected / filtered inputs (private, not "
              f"for sharing): {privacy.log}")
    for line in reason_lines(o.out, rejects, filtered):  # last on stdout: why inputs were left out, and where
        print(line)
    if manifest["counts"]["written"] == 0:
        lists = ((REJECTS_NAME, rejects), (FILTERED_NAME, filtered))
        where = " and ".join(str(o.out / name) for name, rows in lists if rows)
        print(f"ingest build-shards: no sample written from {o.root} (reasons in {where or 'no file: no input'})",
              file=sys.stderr)
        return 1
    if rejected:
        if o.strict:
            print(f"ingest build-shards: --strict and {len(rejected)} rejects", file=sys.stderr)
            return 1
    return 0


def options_json(o: BuildOptions, privacy: Privacy) -> dict:
    """The options that shaped the output, as recorded in the manifest (not --workers: it changes nothing)."""
    out = {k: getattr(o, k) for k in OUTPUT_OPTIONS}
    if o.source == "dicom":
        out.update({k: o.policy_args[k] for k in POLICY_OPTIONS})
    if o.labels_csv is None:
        out["labels_csv"] = None
    elif privacy.private:  # the CSV's name may identify; its hash still pins it
        out["labels_csv"] = "sha256:" + _file_sha256(o.labels_csv)
    else:
        out["labels_csv"] = o.labels_csv.name
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    try:
        return run(BuildOptions.from_args(a), argv)
    except (BuildError, SourceError) as e:
        print(f"ingest build-shards: {e}", file=sys.stderr)
        return 2
