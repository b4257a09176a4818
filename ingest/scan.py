"""`ingest scan --source dicom --root DIR`: a header-only dry run (no pixel is decoded, nothing is written).
Counts by modality, SOP class, transfer syntax (with whether a decoder is installed), photometric
interpretation, view and body part, and what build-shards would write, reject or filter, and why."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from ingest.dicom_filters import add_policy_options, judge, patient_key, policy_from_args, view_of
from ingest.sources.dicom_tree import read_headers
from ingest.sources.folder import walk_files

SOURCES = ("dicom",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest scan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True, choices=SOURCES, help="archive layout under --root")
    p.add_argument("--root", required=True, type=Path, help="folder scanned recursively")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="header-reading processes")
    p.add_argument("--json", type=Path, help="also write the counts as JSON here (no paths, no identifiers)")
    add_policy_options(p)
    return p


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(": ")[0]


def decoder_status(syntax: str) -> str:
    """'installed (plugins)' | 'MISSING (...)' | 'unknown syntax' for one transfer syntax UID."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID
    try:
        decoder = get_decoder(UID(syntax))
    except NotImplementedError:
        return "no decoder known to pydicom"
    if not decoder.is_available:
        return "MISSING (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle)"
    return "installed" + (f" ({', '.join(decoder.available_plugins)})" if decoder.available_plugins else " (native)")


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID
    name = UID(uid).name if uid else "(missing)"
    return name if name == uid or not uid else f"{name} [{uid}]"


def collect(root: Path, workers: int, policy) -> dict:
    unwalked: list = []  # symlink loops and unreadable folders, counted as build-shards rejects them
    files = walk_files(root, root, unwalked)
    t0 = time.perf_counter()
    headers = read_headers(root, files, workers)
    counts = {k: Counter() for k in ("modality", "sop_class", "transfer_syntax", "photometric", "view", "body_part",
                                     "outcome", "rejected", "filtered", "patient_key")}
    for problem in unwalked:
        counts["outcome"]["rejected"] += 1
        counts["rejected"][_reason_kind(problem.reason)] += 1
    for rel, h in zip(files, headers):
        if isinstance(h, str):
            counts["outcome"]["rejected"] += 1
            counts["rejected"][_reason_kind(h)] += 1
            continue
        counts["modality"][h.modality or "(missing)"] += 1
        counts["sop_class"][_uid_name(h.sop_class)] += 1
        counts["transfer_syntax"][h.transfer_syntax] += 1
        counts["photometric"][h.photometric or "(missing)"] += 1
        counts["body_part"][h.body_part or "(empty)"] += 1
        v = judge(h, policy)
        key = patient_key(h, policy, rel) if v.status == "ok" else None
        if isinstance(key, str):
            v.status, v.reason = "rejected", key
        if v.status == "ok":
            counts["outcome"]["would write"] += 1
            counts["view"]["%s (from %s)" % view_of(h)] += 1
            counts["patient_key"][key[1]] += 1
        else:
            counts["outcome"][v.status] += 1
            counts[v.status][_reason_kind(v.reason)] += 1
    seconds = time.perf_counter() - t0
    syntaxes = {_uid_name(s): decoder_status(s) for s in counts["transfer_syntax"] if s}
    counts["transfer_syntax"] = Counter({_uid_name(s): n for s, n in counts["transfer_syntax"].items()})
    return {"files": len(files), "header_seconds": seconds, "decoders": syntaxes,
            "counts": {k: dict(v.most_common()) for k, v in counts.items()}}


def print_report(r: dict, file=None) -> None:
    file = file or sys.stdout
    titles = {"outcome": "build-shards would", "rejected": "rejected, by reason", "filtered": "filtered, by reason",
              "modality": "Modality", "sop_class": "SOP class", "transfer_syntax": "transfer syntax",
              "photometric": "photometric interpretation", "view": "view (of files that would be written)",
              "body_part": "BodyPartExamined", "patient_key": "patient key (of files that would be written)"}
    for key, title in titles.items():
        rows = r["counts"][key]
        if not rows:
            continue
        print(f"{title}:", file=file)
        for name, n in rows.items():
            extra = f"   decoder: {r['decoders'][name]}" if key == "transfer_syntax" and name in r["decoders"] else ""
            print(f"  {n:>8,}  {name}{extra}", file=file)
    rate = r["files"] / r["header_seconds"] if r["header_seconds"] > 0 else float("inf")
    print(f"{r['files']:,} files, headers read in {r['header_seconds']:.1f} s "
          f"({10000 / rate if rate else 0:.1f} s per 10k files)", file=file)
    missing = [n for n, s in r["decoders"].items() if s.startswith("MISSING")]
    if missing:
        print(f"no decoder installed for: {', '.join(missing)}", file=file)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not a.root.is_dir():
        print(f"ingest scan: {a.root}: --root is not a directory", file=sys.stderr)
        return 2
    try:
        policy = policy_from_args(a)
    except ValueError as e:
        print(f"ingest scan: {e}", file=sys.stderr)
        return 2
    report = collect(a.root, a.workers, policy)
    print_report(report)
    if a.json is not None:
        a.json.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return 0
