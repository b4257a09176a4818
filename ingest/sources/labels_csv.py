"""A user CSV for the `folder` and `dicom` sources: `path` (relative to --root) plus optional `patient`, `study`,
`view`, `sex`, `age`, and labels either as one `label` column of class names ('|' for several) or as one
column per label holding 1 / 0 / -1 / blank."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ingest.errors import one_line
from ingest.records import LabelValue, parse_label
from ingest.sources import SourceError

META_COLUMNS = ("path", "patient", "study", "view", "sex", "age")


@dataclass
class CsvRow:
    line: int                 # 1-based line in the file (header = 1)
    path: str
    patient: str | None
    study: str | None
    view: str | None
    sex: str | None
    age: str | None
    labels: dict[str, LabelValue] | None   # None when the row's labels are malformed (see error)
    error: str | None = None


def read_labels_csv(csv_path: Path) -> tuple[tuple[str, ...], list[CsvRow]]:
    if not csv_path.is_file():
        raise SourceError(f"{csv_path}: labels CSV not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SourceError(f"{csv_path}: unreadable CSV ({one_line(e, with_type=True)})") from None
    if "path" not in df.columns:
        raise SourceError(f"{csv_path}: labels CSV needs a 'path' column (has {list(df.columns)})")
    class_mode = "label" in df.columns
    if class_mode:
        extra = [c for c in df.columns if c not in META_COLUMNS and c != "label"]
        if extra:
            raise SourceError(f"{csv_path}: both a 'label' column and label columns {extra}; use one form")
        names = sorted({t.strip() for v in df["label"] for t in v.split("|") if t.strip()})
    else:
        names = [c for c in df.columns if c not in META_COLUMNS]
    rows = []
    get = lambda col, i: (df[col].iat[i].strip() or None) if col in df.columns else None  # noqa: E731
    for i in range(len(df)):
        labels, error = None, None
        try:
            if class_mode:
                mine = {t.strip() for t in df["label"].iat[i].split("|") if t.strip()}
                labels = {n: int(n in mine) for n in names}
            else:
                labels = {n: parse_label(df[n].iat[i], where=f"--labels-csv line {i + 2} {n}") for n in names}
        except ValueError as e:
            error = str(e)
        rows.append(CsvRow(i + 2, df["path"].iat[i].strip(), get("patient", i), get("study", i), get("view", i),
                           get("sex", i), get("age", i), labels, error))
    return tuple(names), rows
