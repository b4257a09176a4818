"""A folder tree of DICOM files: header filters (ingest.dicom_filters), patient from PatientID (or
--patient-from), study from StudyInstanceUID, both replaced by a salted hash at scan time; labels from an
optional `--labels-csv` keyed by path. Paths stay in memory: OUT only ever sees their pseudonyms."""
from __future__ import annotations

from pathlib import Path

from ingest.dicom import DicomHeader, DicomReject, read_header
from ingest.dicom_filters import judge, patient_key, view_of
from ingest.pseudonym import pseudonymise
from ingest.records import Record, Reject, normalise_age, normalise_sex
from ingest.schema import sample_key
from ingest.sources import SourceError, SourceOptions, SourceResult
from ingest.sources.folder import walk_files
from ingest.sources.labels_csv import read_labels_csv


def header_or_reason(path: Path) -> DicomHeader | str:
    try:
        return read_header(path)
    except DicomReject as e:
        return str(e)


def read_headers(root: Path, files: list[str], workers: int) -> list[DicomHeader | str]:
    """Headers (or reject reasons) in file order; many files are read in a process pool."""
    paths = [root / rel for rel in files]
    if workers <= 1 or len(paths) < 256:
        return [header_or_reason(p) for p in paths]
    import multiprocessing as mp
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        return pool.map(header_or_reason, paths, chunksize=64)


def read(root: Path, opts: SourceOptions) -> SourceResult:
    if not opts.pseudonym_salt:
        raise SourceError("the dicom source needs a pseudonym salt (internal error: build sets one)")
    salt, policy = opts.pseudonym_salt, opts.dicom
    dataset = opts.dataset_name or "dicom"
    label_names: tuple[str, ...] = ()
    csv_labels: dict[str, dict] = {}
    rejects: list[Reject] = []
    filtered: list[Reject] = []
    if opts.labels_csv is not None:
        label_names, rows = read_labels_csv(Path(opts.labels_csv))
        for row in rows:
            if row.error is not None:
                rejects.append(Reject(row.path, row.error))
            else:
                csv_labels[row.path] = row.labels
    csv_path = Path(opts.labels_csv).resolve() if opts.labels_csv is not None else None
    all_files = walk_files(root, root, rejects)  # symlink loops and unreadable folders: rejects
    # The labels CSV itself may sit inside the tree: it is not an input.
    files = [rel for rel in all_files if csv_path is None or (root / rel).resolve() != csv_path]
    scanned, key_kinds = [], {}
    for rel, h in zip(files, read_headers(root, files, opts.workers)):
        if isinstance(h, str):
            rejects.append(Reject(rel, h))
            continue
        verdict = judge(h, policy)
        if verdict.status != "ok":
            (filtered if verdict.status == "filtered" else rejects).append(Reject(rel, verdict.reason))
            continue
        key = patient_key(h, policy, rel)
        if isinstance(key, str):
            rejects.append(Reject(rel, key))
            continue
        if not h.study_uid and key[1] != "file":
            rejects.append(Reject(rel, "DICOM without StudyInstanceUID (--patient-from file makes each file "
                                       "its own patient and study)"))
            continue
        if opts.labels_csv is not None and rel not in csv_labels:
            rejects.append(Reject(rel, "not listed in --labels-csv"))
            continue
        key_kinds[key[1]] = key_kinds.get(key[1], 0) + 1
        scanned.append((rel, h, key[0], verdict.flags))
    found = set(all_files)
    rejects += [Reject(p, "listed in --labels-csv but not found under --root") for p in sorted(set(csv_labels) - found)]
    records, per_study = [], {}
    for rel, h, patient_value, flags in scanned:  # sorted by path: the view index inside a study is stable
        patient = pseudonymise(patient_value, salt, "d")
        study = pseudonymise(h.study_uid or "file:" + rel, salt, "s")
        n = per_study[(patient, study)] = per_study.get((patient, study), 0) + 1
        view, view_from = view_of(h)
        if view_from == "ViewCodeSequence":
            flags = {**flags, "view_from": "ViewCodeSequence"}
        records.append(Record(
            key=sample_key(dataset, patient, study, n), dataset=dataset, source_path=rel, patient_id=patient,
            study_id=study, view=view, labels=csv_labels.get(rel, {}) if opts.labels_csv is not None else {},
            sex=normalise_sex(h.sex or None), age=normalise_age(h.age or None), kind="dicom", flags=flags,
        ))
    if not records and not rejects and not filtered:
        raise SourceError(f"{root}: no files found")
    notes = {"patient_key": {"rule": "PatientID" + (f", else --patient-from {policy.patient_from}"
                                                     if policy.patient_from else ""),
                             "counts": dict(sorted(key_kinds.items()))}}
    return SourceResult(dataset, label_names, records, rejects, filtered=filtered, notes=notes)
