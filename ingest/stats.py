"""`ingest stats OUT`: counts per split, label state (1 / 0 / -1 / blank) per label, view, patients with
2+ images (the MICLe positives) and metadata flags (view contradictions, colour inputs), read from the shards."""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from collections import Counter
from pathlib import Path

from ingest.schema import SPLITS, VIEWS, ShardFormatError, load_manifest
from ingest.shards import iter_shard

LABEL_STATES = ("1", "0", "-1", "blank")


def _state(v: float) -> str:
    return "blank" if math.isnan(v) else str(int(v))


def collect(out: Path) -> dict:
    """{split: {samples, patients, patients_2plus, images_of_patients_2plus, views, labels: {name: {state: n}}}}."""
    m = load_manifest(out)
    names = m.label_names
    result = {"label_names": names, "splits": {}}
    for split in m.splits():
        per_patient: Counter = Counter()
        views: Counter = Counter()
        flags: Counter = Counter()
        labels = {n: Counter() for n in names}
        samples = 0
        for sh in m.shards(split):
            for s in iter_shard(sh.path):
                samples += 1
                (pid,) = struct.unpack("<q", s["pid"])
                per_patient[pid] += 1
                meta = json.loads(s["json"])
                views[meta.get("view", "UNKNOWN")] += 1
                flags.update(meta.get("flags", {}).keys())
                for n, v in zip(names, struct.unpack(f"<{len(names)}f", s["lbl"])):
                    labels[n][_state(v)] += 1
        multi = [c for c in per_patient.values() if c >= 2]
        result["splits"][split] = {
            "samples": samples, "patients": len(per_patient), "patients_2plus": len(multi),
            "images_of_patients_2plus": sum(multi), "views": {v: views.get(v, 0) for v in VIEWS},
            "labels": {n: {st: labels[n].get(st, 0) for st in LABEL_STATES} for n in names},
            "flags": dict(sorted(flags.items())),
        }
    return result


def _table(rows: list[tuple]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def render(stats: dict) -> str:
    splits = [s for s in SPLITS if s in stats["splits"]]
    sp = stats["splits"]
    rows = [("split", "samples", "patients", "patients 2+ images", "their images", *VIEWS)]
    for s in splits:
        d = sp[s]
        rows.append((s, f"{d['samples']:,}", f"{d['patients']:,}", f"{d['patients_2plus']:,}",
                     f"{d['images_of_patients_2plus']:,}", *(f"{d['views'][v]:,}" for v in VIEWS)))
    parts = [_table(rows)]
    flag_names = sorted({f for s in splits for f in sp[s]["flags"]})
    if flag_names:
        parts.append(_table([("flag", *splits)] + [(f, *(f"{sp[s]['flags'].get(f, 0):,}" for s in splits))
                                                   for f in flag_names]))
    if stats["label_names"]:
        head = ("label", *(f"{s}:{st}" for s in splits for st in LABEL_STATES))
        lrows = [head] + [(n, *(f"{sp[s]['labels'][n][st]:,}" for s in splits for st in LABEL_STATES))
                          for n in stats["label_names"]]
        parts.append(_table(lrows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ingest stats", description=__doc__)
    p.add_argument("out", type=Path, help="an ingest output folder (holding manifest.json)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    a = p.parse_args(argv)
    try:
        stats = collect(a.out)
    except ShardFormatError as e:
        print(f"ingest stats: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1) if a.json else render(stats))
    return 0
