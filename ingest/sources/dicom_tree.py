"""A folder tree of DICOM files: patient from PatientID and study from StudyInstanceUID, both replaced by a
salted hash at scan time (ingest.dicom.pseudonymise); labels from an optional `--labels-csv` keyed by path."""
from __future__ import annotations

from pathlib import Path

from ingest.dicom import DicomReject, pseudonymise, read_header
from ingest.records import Record, Reject, normalise_age, normalise_sex, normalise_view
from ingest.schema import sample_key
from ingest.sources import SourceError, SourceOptions, SourceResult
from ingest.sources.folder import walk_files
from ingest.sources.labels_csv import read_labels_csv


def _header_or_reason(path: Path) -> dict | str:
    try:
        return read_header(path)
    except DicomReject as e:
        return str(e)


def _headers(root: Path, files: list[str], workers: int):
    """Header dicts (or reject reasons) in file order; many files are read in a process pool."""
    paths = [root / rel for rel in files]
    if workers <= 1 or len(paths) < 256:
        return [_header_or_reason(p) for p in paths]
    import multiprocessing as mp
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        return pool.map(_header_or_reason, paths, chunksize=64)


def read(root: Path, opts: SourceOptions) -> SourceResult:
    if not opts.pseudonym_salt:
        raise SourceError("the dicom source needs a pseudonym salt (internal error: build sets one)")
    dataset = opts.dataset_name or "dicom"
    label_names: tuple[str, ...] = ()
    csv_labels: dict[str, dict] = {}
    rejects: list[Reject] = []
    if opts.labels_csv is not None:
        label_names, rows = read_labels_csv(Path(opts.labels_csv))
        for row in rows:
            if row.error is not None:
                rejects.append(Reject(row.path, row.error))
            else:
                csv_labels[row.path] = row.labels
    csv_path = Path(opts.labels_csv).resolve() if opts.labels_csv is not None else None
    all_files = walk_files(root, root)
    # The labels CSV itself may sit inside the tree: it is not an input.
    files = [rel for rel in all_files if csv_path is None or (root / rel).resolve() != csv_path]
    scanned = []
    for rel, h in zip(files, _headers(root, files, opts.workers)):
        if isinstance(h, str):
            rejects.append(Reject(rel, h))
            continue
        if not h["PatientID"].strip():
            rejects.append(Reject(rel, "DICOM without PatientID (patient-level splits need it)"))
            continue
        if not h["StudyInstanceUID"].strip():
            rejects.append(Reject(rel, "DICOM without StudyInstanceUID"))
            continue
        if opts.labels_csv is not None and rel not in csv_labels:
            rejects.append(Reject(rel, f"not listed in {Path(opts.labels_csv).name}"))
            continue
        scanned.append((rel, h))
    found = set(all_files)
    rejects += [Reject(p, f"listed in {Path(opts.labels_csv).name} but not found under --root")
                for p in sorted(set(csv_labels) - found)]
    records, per_study = [], {}
    for rel, h in scanned:  # sorted by path: the view index inside a study is stable
        patient = pseudonymise(h["PatientID"], opts.pseudonym_salt, "d")
        study = pseudonymise(h["StudyInstanceUID"], opts.pseudonym_salt, "s")
        n = per_study[(patient, study)] = per_study.get((patient, study), 0) + 1
        labels = csv_labels.get(rel, {}) if opts.labels_csv is not None else {}
        records.append(Record(
            key=sample_key(dataset, patient, study, n), dataset=dataset, source_path=rel, patient_id=patient,
            shard_path=pseudonymise(rel, opts.pseudonym_salt, "f"),  # the salt holder can map it back
            study_id=study, view=normalise_view(h["ViewPosition"] or None), labels=labels,
            sex=normalise_sex(h["PatientSex"] or None), age=normalise_age(h["PatientAge"] or None), kind="dicom",
        ))
    if not records and not rejects:
        raise SourceError(f"{root}: no files found")
    return SourceResult(dataset, label_names, records, rejects)
