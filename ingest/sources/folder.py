"""Image folders: labels from class sub-folders (one-hot over the sorted folder names), or a labels CSV
(`--labels-csv`, see labels_csv.py). Without a patient column each image is its own patient. File names and
CSV patient / study values may identify: OUT sees only their salted pseudonyms."""
from __future__ import annotations

import os
from pathlib import Path

from ingest.pseudonym import pseudonymise
from ingest.records import Record, Reject, normalise_age, normalise_sex, normalise_view
from ingest.schema import sample_key
from ingest.sources import SourceError, SourceOptions, SourceResult, markers_in_tree
from ingest.sources.labels_csv import read_labels_csv


def path_id(rel: str, salt: bytes) -> str:
    """A stable opaque id for an image without a patient (file names can carry identifiers)."""
    return pseudonymise(rel, salt, "i")


def walk_files(folder: Path, root: Path, problems: list[Reject] | None = None) -> list[str]:
    """Every file under ``folder`` as a sorted POSIX path relative to ``root``, following symlinked folders and
    files (a file reached by two paths is listed under both). A link back to a folder it sits in (a loop) is not
    followed, nor is an unreadable folder: each lands in ``problems`` with the reason, so nothing goes unsaid."""
    out: list[str] = []
    problems = [] if problems is None else problems
    # os.walk(followlinks=True) would recurse forever on a loop; the stack of (device, inode) of the folders
    # above each entry is what tells a loop from a second link to a sibling folder.
    try:
        st = os.stat(folder)
        top = [(st.st_dev, st.st_ino)]
    except OSError as e:
        problems.append(Reject(Path(folder).relative_to(root).as_posix() or ".", _os_reason("unreadable folder", e)))
        return out
    _walk(Path(folder), Path(root), top, out, problems)
    return sorted(out)


def _os_reason(what: str, e: OSError) -> str:
    return f"{what} ({e.strerror or type(e).__name__})"


def _walk(folder: Path, root: Path, ancestors: list[tuple[int, int]], out: list[str], problems: list[Reject]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        problems.append(Reject(folder.relative_to(root).as_posix(), _os_reason("unreadable folder", e)))
        return
    for entry in entries:
        path = folder / entry.name
        rel = path.relative_to(root).as_posix()
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if not is_dir:
            out.append(rel)  # files, dangling links, specials: the reader rejects what it cannot open
            continue
        try:
            st = os.stat(path)
        except OSError as e:
            problems.append(Reject(rel, _os_reason("unreadable folder", e)))
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in ancestors:
            # no link target in the reason: for folder / dicom sources it is a raw path, which may identify
            problems.append(Reject(rel, "symlink loop: links back to a folder it is inside of; not followed"))
            continue
        _walk(path, root, ancestors + [ident], out, problems)


def _from_class_folders(root: Path, dataset: str, salt: bytes) -> SourceResult:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"{root}: no class sub-folders (and no --labels-csv)")
    records, rejects = [], []
    files = walk_files(root, root, rejects)
    for rel in files:
        if "/" not in rel:
            rejects.append(Reject(rel, "file at the top of --root, outside any class folder"))
            continue
        cls = rel.split("/", 1)[0]
        if cls not in classes:  # a hidden folder
            rejects.append(Reject(rel, "in a hidden folder, not a class folder"))
            continue
        pid = path_id(rel, salt)
        records.append(Record(key=sample_key(dataset, pid, "s0", 0), dataset=dataset, source_path=rel,
                              patient_id=pid, study_id="s0", view="UNKNOWN",
                              labels={c: int(c == cls) for c in classes}))
    return SourceResult(dataset, tuple(classes), records, rejects)


def _from_csv(root: Path, csv_path: Path, dataset: str, salt: bytes) -> SourceResult:
    names, rows = read_labels_csv(csv_path)
    records, rejects, per_study = [], [], {}
    for row in rows:
        if row.error is not None:
            rejects.append(Reject(row.path, row.error))
            continue
        if row.path.startswith("/") or ".." in row.path.split("/"):
            rejects.append(Reject(row.path, f"--labels-csv line {row.line}: path must be relative to --root"))
            continue
        patient = pseudonymise(row.patient, salt, "p") if row.patient else path_id(row.path, salt)
        study = pseudonymise(row.study, salt, "s") if row.study else "s0"
        n = per_study[(patient, study)] = per_study.get((patient, study), -1) + 1
        records.append(Record(key=sample_key(dataset, patient, study, n), dataset=dataset, source_path=row.path,
                              patient_id=patient, study_id=study, view=normalise_view(row.view),
                              labels=row.labels, sex=normalise_sex(row.sex), age=normalise_age(row.age)))
    return SourceResult(dataset, names, records, rejects)


SOURCE_TITLES = {"chexpert": "CheXpert", "nih": "NIH ChestX-ray14", "mimic": "MIMIC-CXR-JPG"}


def refuse_other_layouts(root: Path) -> None:
    """A public dataset packed as class folders gets its split folders as labels, lateral films and one patient
    per image: wrong output without an error. Its own source reads its CSVs instead."""
    found = markers_in_tree(root)
    if found:
        source, path = found[0]
        raise SourceError(f"{path}: {root} holds {SOURCE_TITLES[source]} metadata; use --source {source} "
                          f"(or --force-folder to pack it as plain class folders anyway)")


def read(root: Path, opts: SourceOptions) -> SourceResult:
    if not opts.pseudonym_salt:
        raise SourceError("the folder source needs a pseudonym salt (internal error: build sets one)")
    if not opts.force_folder:
        refuse_other_layouts(root)
    dataset = opts.dataset_name or "folder"
    if opts.labels_csv is not None:
        return _from_csv(root, Path(opts.labels_csv), dataset, opts.pseudonym_salt)
    return _from_class_folders(root, dataset, opts.pseudonym_salt)
