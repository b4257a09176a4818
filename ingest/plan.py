"""The whole run decided up front from the record list: view filter, duplicate keys, patient table, splits and
the seeded order of samples in each split. Workers only fill in pixels, so output never depends on timing."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ingest.records import Record, Reject
from ingest.schema import SPLITS
from ingest.splits import assign_splits


@dataclass
class Plan:
    dataset: str
    label_names: tuple[str, ...]
    patients: list[str]                       # sorted pseudonymous ids; .pid is the index into it
    patient_index: dict[str, int]
    order: dict[str, list[Record]]            # split -> records in shard order (seeded shuffle)
    scan_rejects: list[Reject]                # unusable before any pixel was read
    filtered: list[Reject]                    # excluded by --views (not errors, but listed and counted)
    num_inputs: int
    fingerprint: str = field(default="")

    @property
    def num_planned(self) -> int:
        return sum(len(v) for v in self.order.values())

    def part_ranges(self, k: int, n: int) -> dict[str, tuple[int, int]]:
        """Part ``k`` of ``n``: [start, end) of each split's order. The splits' orders, one after the other,
        are cut into n runs of near-equal length, so every planned record is in exactly one part."""
        total = self.num_planned
        lo, hi = total * k // n, total * (k + 1) // n
        ranges, offset = {}, 0
        for s in SPLITS:
            length = len(self.order[s])
            ranges[s] = (min(max(lo - offset, 0), length), min(max(hi - offset, 0), length))
            offset += length
        return ranges


def shuffle_rank(key: str, seed: int) -> bytes:
    """Sort key of a seeded shuffle that depends only on (seed, sample key): stable across library versions."""
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def make_plan(dataset: str, label_names: tuple[str, ...], records: list[Record], scan_rejects: list[Reject], *,
              views: frozenset[str], split_mode: str, split_seed: int, shuffle_seed: int, val_frac: float,
              test_frac: float, options_for_fingerprint: dict) -> Plan:
    filtered, kept, rejects = [], [], list(scan_rejects)
    seen: dict[str, str] = {}
    for r in sorted(records, key=lambda r: (r.key, r.source_path)):
        if r.key in seen:
            rejects.append(Reject(r.source_path, f"duplicate sample key {r.key}"))
            continue
        seen[r.key] = r.source_path
        if r.view not in views:
            filtered.append(Reject(r.source_path, f"view {r.view} not selected by --views"))
            continue
        kept.append(r)
    patient_split = assign_splits(kept, mode=split_mode, seed=split_seed, val_frac=val_frac, test_frac=test_frac)
    patients = sorted({r.patient_id for r in kept})
    order: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in kept:
        order[patient_split[r.patient_id]].append(r)
    for s in SPLITS:
        order[s].sort(key=lambda r: shuffle_rank(r.key, shuffle_seed))
    plan = Plan(dataset, tuple(label_names), patients, {p: i for i, p in enumerate(patients)}, order,
                rejects, filtered, num_inputs=len(records) + len(scan_rejects))
    h = hashlib.sha256(json.dumps(options_for_fingerprint, sort_keys=True).encode())
    for s in SPLITS:
        for r in order[s]:
            meta = json.dumps([r.view, r.labels, r.sex, r.age, r.flags, r.study_id, r.kind], sort_keys=True)
            h.update(f"{s}\0{r.key}\0{r.source_path}\0{r.patient_id}\0{meta}\n".encode())
    plan.fingerprint = h.hexdigest()
    return plan
