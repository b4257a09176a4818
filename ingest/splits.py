"""Patient-level, deterministic splits: a hash of (split seed, patient id) decides, or the dataset's official
split. A patient never lands in two splits."""
from __future__ import annotations

import hashlib

from ingest.records import Record

TRAINVAL = "trainval"  # official "train+val" pool (CheXpert train.csv, NIH train_val_list.txt): val is hashed out


def patient_unit(patient_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, patient id): the same on every machine and Python."""
    digest = hashlib.sha256(f"{seed}\0{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hashed_split(patient_id: str, seed: int, val_frac: float, test_frac: float) -> str:
    u = patient_unit(patient_id, seed)
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "val"
    return "train"


def check_fractions(val_frac: float, test_frac: float) -> None:
    if not (0.0 <= val_frac < 1.0 and 0.0 <= test_frac < 1.0 and val_frac + test_frac < 1.0):
        raise ValueError(f"--val-frac {val_frac} / --test-frac {test_frac}: each in [0, 1) and their sum < 1")


def assign_splits(records: list[Record], *, mode: str, seed: int, val_frac: float, test_frac: float) -> dict[str, str]:
    """patient id -> split. mode 'official' uses Record.official_split (val hashed out of a trainval pool);
    'hash' ignores it. Raises ValueError when an official split puts one patient in two splits."""
    check_fractions(val_frac, test_frac)
    out: dict[str, str] = {}
    official: dict[str, str] = {}
    for r in records:
        if mode == "official" and r.official_split is not None:
            prev = official.setdefault(r.patient_id, r.official_split)
            if prev != r.official_split:
                raise ValueError(f"patient {r.patient_id} is in two official splits ({prev}, {r.official_split}), "
                                 f"e.g. {r.source_path}; use --split-mode hash")
    for r in records:
        pid = r.patient_id
        if pid in out:
            continue
        o = official.get(pid)
        if o is None:
            out[pid] = hashed_split(pid, seed, val_frac, test_frac)
        elif o == TRAINVAL:
            out[pid] = "val" if patient_unit(pid, seed) < val_frac else "train"
        else:
            out[pid] = o
    return out
