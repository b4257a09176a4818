"""NIH ChestX-ray14: `Data_Entry_2017*.csv` + PNGs in one folder or in `images_001..012/images/`.

Labels: the pipe-separated `Finding Labels` to 14 binary labels (`No Finding` = all 0). Study = the `Follow-up #`
column (never the file name: they disagree for ~24k rows). Official split: `test_list.txt` -> test,
`train_val_list.txt` -> trainval, honoured when both lists are present.
"""
from __future__ import annotations

import os
from pathlib import Path


from ingest.records import Record, Reject, normalise_age, normalise_sex, normalise_view
from ingest.schema import NIH_LABELS, sample_key
from ingest.sources import SourceError, SourceOptions, SourceResult, read_csv_table

REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                    "Patient Gender", "View Position")
NO_FINDING = "No Finding"


def find_data_entry_csv(root: Path) -> Path:
    found = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().startswith("data_entry_2017")
                   and (p.name.lower().endswith(".csv") or p.name.lower().endswith(".csv.gz")))
    if not found:
        raise SourceError(f"{root}: no Data_Entry_2017*.csv (NIH ChestX-ray14 layout expected)")
    if len(found) > 1:
        raise SourceError(f"{root}: several Data_Entry_2017 CSVs ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def index_images(root: Path) -> dict[str, str]:
    """File name -> path relative to root, over root/, root/images/ and root/images_*/images/."""
    folders = [root, root / "images"]
    folders += sorted(p / "images" for p in root.glob("images_*") if (p / "images").is_dir())
    out: dict[str, str] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        rel = folder.relative_to(root).as_posix()
        with os.scandir(folder) as it:
            for e in it:
                if e.is_file() and e.name.lower().endswith(".png"):
                    out.setdefault(e.name, e.name if rel == "." else f"{rel}/{e.name}")
    return out


def parse_findings(text: str) -> dict[str, int]:
    """'Cardiomegaly|Effusion' -> 14 binary labels; 'No Finding' -> all 0; an unknown finding raises."""
    names = [t.strip() for t in str(text).split("|") if t.strip()]
    if not names:
        raise ValueError("empty Finding Labels")
    if NO_FINDING in names:
        if len(names) > 1:
            raise ValueError(f"'No Finding' together with findings: {text!r}")
        return {n: 0 for n in NIH_LABELS}
    unknown = [n for n in names if n not in NIH_LABELS]
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown} in {text!r}")
    return {n: int(n in names) for n in NIH_LABELS}


def _official_split(root: Path) -> dict[str, str] | None:
    lists = {name: root / name for name in ("train_val_list.txt", "test_list.txt")}
    present = [n for n, p in lists.items() if p.is_file()]
    if not present:
        return None
    if len(present) == 1:
        raise SourceError(f"{root}: only {present[0]} found; "
                          "the official split needs both train_val_list.txt and test_list.txt")
    out = {}
    for name, split in (("train_val_list.txt", "trainval"), ("test_list.txt", "test")):
        for line in lists[name].read_text().split():
            if out.setdefault(line, split) != split:
                raise SourceError(f"{root}: {line} is in both train_val_list.txt and test_list.txt")
    return out


def read(root: Path, opts: SourceOptions) -> SourceResult:
    csv_path = find_data_entry_csv(root)
    df = read_csv_table(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SourceError(f"{csv_path}: not an NIH Data_Entry CSV, missing columns {missing}")
    images = index_images(root)
    official = _official_split(root)
    records, rejects = [], []
    for i, (name, findings, followup, pid, age, sex, view) in enumerate(
            zip(*(df[c].tolist() for c in REQUIRED_COLUMNS))):
        where = f"{csv_path.name} row {i + 2}"
        rel = images.get(name)
        if rel is None:
            rejects.append(Reject(name, f"missing file named in {csv_path.name}"))
            continue
        try:
            labels = parse_findings(findings)
            patient, fu = int(pid), int(followup)
        except ValueError as e:
            rejects.append(Reject(rel, f"{where}: {e}"))
            continue
        split = None
        if official is not None:
            split = official.get(name)
            if split is None:
                rejects.append(Reject(rel, "not in train_val_list.txt or test_list.txt (official split)"))
                continue
        records.append(Record(
            key=sample_key("nih", f"p{patient:08d}", f"s{fu:03d}", 1),
            dataset="nih", source_path=rel, patient_id=f"{patient:08d}", study_id=f"followup{fu}",
            view=normalise_view(view), labels=labels, sex=normalise_sex(sex), age=normalise_age(age),
            official_split=split,
        ))
    return SourceResult("nih", NIH_LABELS, records, rejects, has_official_split=official is not None)
