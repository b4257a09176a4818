"""Final outputs of a build: `manifest.json` (last, atomically), `patients.json`, `rejects.tsv`, `filtered.tsv`,
and the summary table printed at the end."""
from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

from ingest.files import atomic_write
from ingest.schema import FORMAT_VERSION, MANIFEST_NAME, REJECTS_NAME, SPLITS
from ingest.state import write_json_atomic

PATIENTS_NAME = "patients.json"
FILTERED_NAME = "filtered.tsv"


def tool_versions() -> dict:
    from PIL import features
    out = {"python": platform.python_version(), "libjpeg_turbo": features.version("libjpeg_turbo")}
    for dist in ("Pillow", "numpy", "pandas", "pydicom"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _tsv_cell(text: str) -> str:
    return str(text).replace("\t", " ").replace("\n", " ").replace("\r", " ")


# The columns of rejects.tsv and filtered.tsv: public datasets name inputs by path, private sources (paths may
# identify) by salted pseudonym. The header depends only on that, never on whether any row was written.
PUBLIC_COLUMNS = ("source_path", "reason")
PRIVATE_REJECT_COLUMNS = ("input_id", "sha256", "reason")
PRIVATE_FILTERED_COLUMNS = ("input_id", "reason")


def write_tsv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    """A header of ``columns``, then one line per row (each row has exactly these keys)."""
    for row in rows:
        if tuple(row) != columns:
            raise AssertionError(f"{path.name}: row columns {list(row)} != header {list(columns)}")
    with atomic_write(path, text=True) as f:
        f.write("\t".join(columns) + "\n")
        for row in rows:
            f.write("\t".join(_tsv_cell(row[c]) for c in columns) + "\n")


def write_outputs(out: Path, *, dataset: str, label_names, patients: list[str], splits: dict, rejects: list[dict],
                  filtered: list[dict], num_inputs: int, options: dict, extra: dict, private: bool,
                  finished: bool = True) -> dict:
    """Write rejects.tsv, filtered.tsv, patients.json, then manifest.json; returns the manifest dict. A reject
    is {source_path, reason} for public datasets, {input_id, sha256, reason} where paths may identify.
    A run that wrote no sample is never finished; with ``finished`` False only the two TSVs (why it failed) are
    written, no manifest, so `ingest verify` and the trainer refuse the folder and a rerun needs no --overwrite."""
    written = sum(s["num_samples"] for s in splits.values())
    if num_inputs != written + len(rejects) + len(filtered):
        raise AssertionError(f"inputs {num_inputs} != written {written} + rejected {len(rejects)} "
                             f"+ filtered {len(filtered)}")
    write_tsv(out / REJECTS_NAME, rejects, PRIVATE_REJECT_COLUMNS if private else PUBLIC_COLUMNS)
    write_tsv(out / FILTERED_NAME, filtered, PRIVATE_FILTERED_COLUMNS if private else PUBLIC_COLUMNS)
    manifest = {
        "format_version": FORMAT_VERSION,
        "datasets": [dataset],
        "label_names": list(label_names),
        "num_patients": len(patients),
        "patient_table": PATIENTS_NAME,
        "splits": {s: splits[s] for s in SPLITS},
        "counts": {"inputs": num_inputs, "written": written, "rejected": len(rejects), "filtered": len(filtered)},
        "rejects": rejects,
        "filtered_list": FILTERED_NAME,
        "options": options,
        "tool_versions": tool_versions(),
        **extra,
    }
    if finished and written > 0:
        write_json_atomic(out / PATIENTS_NAME, patients)
        write_json_atomic(out / MANIFEST_NAME, manifest, indent=1)
    return manifest


def summary_table(manifest: dict, file=None) -> None:
    file = file or sys.stdout
    rows = [("split", "samples", "patients", "shards", "MiB")]
    for s in SPLITS:
        sp = manifest["splits"][s]
        rows.append((s, f"{sp['num_samples']:,}", f"{sp['num_patients']:,}", str(len(sp["shards"])),
                     f"{sum(x['num_bytes'] for x in sp['shards']) / 2**20:,.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), file=file)
    c = manifest["counts"]
    print(f"inputs {c['inputs']:,} = written {c['written']:,} + rejected {c['rejected']:,}"
          f" + filtered {c['filtered']:,}", file=file)


def reason_lines(out: Path, rejects: list[dict], filtered: list[dict], top: int = 10) -> list[str]:
    """The closing lines of a build: counts per reject and filter reason (grouped at ' ('), each group followed
    by the file that lists them one by one."""
    lines = []
    for kind, rows, name in (("rejected", rejects, REJECTS_NAME), ("filtered", filtered, FILTERED_NAME)):
        reasons: dict[str, int] = {}
        for r in rows:
            reason = r["reason"].split(" (")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        lines += [f"  {kind} {n:,}: {reason}" for reason, n in ranked[:top]]
        if len(ranked) > top:
            lines.append(f"  {kind} {sum(n for _, n in ranked[top:]):,}: {len(ranked) - top} other reasons")
        if rows:
            lines.append(f"{len(rows):,} {kind}, listed with their reasons in {out / name}")
    return lines
