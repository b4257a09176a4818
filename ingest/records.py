"""What a source reader yields per input image (`Record`) and the small normalisers every reader shares:
views, sex, age and label states."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ingest.schema import VIEWS, parse_views

# A label is exactly as in the source: 1 positive, 0 negative, -1 uncertain, None not mentioned (never 0).
LabelValue = int | None

_LATERAL_CODES = {"LAT", "LATERAL", "LL", "RL", "LLD", "RLD", "XTABLE LATERAL", "LEFT LATERAL", "RIGHT LATERAL"}
AGE_CAP_YEARS = 90  # ages above 89 are identifying (HIPAA); CheXpert caps at 90 the same way


@dataclass
class Record:
    """One input image as a source describes it, before any pixel is read."""
    key: str                      # stable unique sample key (ingest.schema.sample_key)
    dataset: str
    source_path: str              # relative to --root, POSIX separators (dicom / folder: never written to OUT)
    patient_id: str               # pseudonymous patient id (already hashed for DICOM)
    study_id: str
    view: str                     # one of VIEWS
    labels: dict[str, LabelValue]
    sex: str | None = None        # "Male" | "Female" | "Other" | None
    age: int | None = None        # years, capped at AGE_CAP_YEARS
    official_split: str | None = None  # train | val | test when the dataset defines it
    flags: dict = field(default_factory=dict)  # e.g. {"view_contradiction": "..."}
    kind: str = "image"           # "image" (Pillow) or "dicom" (pydicom)


@dataclass(frozen=True)
class Reject:
    """One input left out of the shards, from the reader or the decode worker to resume state, rejects.tsv /
    filtered.tsv and the private log: the same record whether rejected (an error) or filtered (by choice)."""
    source_path: str              # relative to --root (dicom / folder: never written to OUT, not even its state)
    reason: str
    sha256: str = ""              # of the source bytes, when they were read; "" otherwise
    key: str = ""                 # the planned sample key, once the input reached the plan; "" before

    def state_row(self) -> list[str]:
        """The form kept in OUT's resume state: the key stands in for the path, which may identify."""
        return [self.key, self.sha256, self.reason]

    @classmethod
    def from_state_row(cls, row: list[str], source_path_of: dict[str, str]) -> Reject:
        """KeyError when the key is not in ``source_path_of`` (state of another plan)."""
        key, sha256, reason = row
        return cls(source_path_of[key], reason, sha256, key)


def normalise_view(code: str | None) -> str:
    """Map a dataset's view code (AP, PA, LL, LATERAL, 'AP AXIAL', ...) to PA / AP / LAT / UNKNOWN."""
    if code is None or (isinstance(code, float) and math.isnan(code)):
        return "UNKNOWN"
    c = str(code).strip().upper()
    if c in _LATERAL_CODES:
        return "LAT"
    first = c.split()[0] if c else ""
    if first in ("PA", "AP"):
        return first
    return "UNKNOWN"


def parse_views_option(text: str) -> frozenset[str]:
    """`--views`: the one view selection of ``ingest.schema.parse_views``, with the option named in errors."""
    try:
        return parse_views(text)
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def normalise_sex(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    v = str(value).strip().upper()
    return {"M": "Male", "MALE": "Male", "F": "Female", "FEMALE": "Female", "O": "Other", "OTHER": "Other"}.get(v)


_DICOM_AGE = re.compile(r"^(\d{1,3})([DWMY])$")


def normalise_age(value) -> int | None:
    """Years as an int capped at 90; accepts numbers, '67', '67.0' and DICOM AS strings ('067Y', '011M')."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value).strip().upper()
    if not s:
        return None
    m = _DICOM_AGE.match(s)
    if m:
        years = int(m.group(1)) if m.group(2) == "Y" else 0
    else:
        try:
            years = int(float(s))
        except ValueError:
            return None
    if years < 0:
        return None
    return min(years, AGE_CAP_YEARS)


def parse_label(value, *, where: str) -> LabelValue:
    """A CSV cell to 1 / 0 / -1 / None. Blank means 'not mentioned' and stays None; anything else is an error."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value).strip()
    if s == "":
        return None
    try:
        f = float(s)
    except ValueError:
        raise ValueError(f"{where}: label value {s!r} is not 1, 0, -1 or blank") from None
    if f not in (1.0, 0.0, -1.0):
        raise ValueError(f"{where}: label value {s!r} is not 1, 0, -1 or blank")
    return int(f)
