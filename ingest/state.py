"""Resume state: one small JSON per finished segment of a split's plan (a shard plus the rejects met while
filling it), written after the shard's rename. A segment file is the only proof that a shard is finished."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ingest.records import Record, Reject
from ingest.schema import INDEX_SUFFIX, SPLITS
from ingest.files import atomic_write, sha256_file

STATE_DIR = ".ingest-state"
PLAN_FILE = "plan.json"
FAILED_FILE = "failed.json"  # the run got to the end but failed (no sample, or --strict and rejects): no manifest
PARTS_DIR = ".ingest-parts"  # --part K/N: OUT/.ingest-parts/part-K-of-N/, each laid out like OUT, no manifest
PART_ARGS_FILE = "args.json"  # in a part's state: its build-shards arguments (less --part), for the merge
PART_DONE_FILE = "complete.json"  # in a part's state: every segment of its slice is written and verified


@dataclass
class Segment:
    split: str
    seq: int                    # segment number inside the split
    plan_start: int             # [plan_start, plan_end) of the split's planned records
    plan_end: int
    shard: dict | None          # {name, num_samples, sha256, num_bytes} or None (only rejects)
    rejects: list[Reject] = field(default_factory=list)   # kept on disk as Reject.state_row (no path)

    def state_json(self) -> dict:
        return {**asdict(self), "rejects": [r.state_row() for r in self.rejects]}


def write_json_atomic(path: Path, data, *, indent: int | None = None) -> None:
    with atomic_write(path, text=True) as f:
        json.dump(data, f, indent=indent, sort_keys=True)
        f.write("\n")


def segment_path(out: Path, split: str, seq: int) -> Path:
    return out / STATE_DIR / f"{split}-{seq:06d}.json"


def save_segment(out: Path, seg: Segment) -> None:
    write_json_atomic(segment_path(out, seg.split, seg.seq), seg.state_json())


def read_plan_fingerprint(out: Path) -> str | None:
    p = out / STATE_DIR / PLAN_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def save_plan_fingerprint(out: Path, fingerprint: str) -> None:
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / STATE_DIR / PLAN_FILE, {"fingerprint": fingerprint})


def _segment_ok(out: Path, seg: Segment, expected_start: int, plan_end: int) -> bool:
    if seg.plan_start != expected_start or not (seg.plan_start <= seg.plan_end <= plan_end):
        return False
    if seg.shard is None:
        return True
    tar = out / seg.split / seg.shard["name"]
    idx = tar.with_suffix(INDEX_SUFFIX)
    return (tar.is_file() and idx.is_file() and tar.stat().st_size == seg.shard["num_bytes"]
            and sha256_file(tar) == seg.shard["sha256"])


def _read_segment(p: Path, source_path_of: dict[str, str]) -> Segment | None:
    try:
        data = json.loads(p.read_text())
        data["rejects"] = [Reject.from_state_row(row, source_path_of) for row in data["rejects"]]
        return Segment(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def load_segments(out: Path, order: dict[str, list[Record]],
                  ranges: dict[str, tuple[int, int]] | None = None) -> dict[str, list[Segment]]:
    """The finished, verified segments per split, in order, covering each split's planned records ``order``
    from its range start (default: the whole split). The first bad or missing one ends a split's list; its
    files and later segments are removed so the run redoes them."""
    done: dict[str, list[Segment]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        start, end = (ranges or {}).get(split, (0, len(order[split])))
        source_path_of = {r.key: r.source_path for r in order[split][start:end]}
        seq = 0
        while True:
            p = segment_path(out, split, seq)
            if not p.is_file():
                break
            seg = _read_segment(p, source_path_of)
            if seg is None or not _segment_ok(out, seg, start, end):
                for later in sorted((out / STATE_DIR).glob(f"{split}-*.json")):
                    if int(later.stem.rsplit("-", 1)[1]) >= seq:
                        later.unlink()
                break
            done[split].append(seg)
            start, seq = seg.plan_end, seq + 1
    return done


def keep_until_first_reject(out: Path, done: dict[str, list[Segment]]) -> dict[str, list[Segment]]:
    """After a failed run: each split keeps its segments before the first one with a reject, so a rerun (once
    the inputs are fixed) redoes the rejected inputs and what follows, and resumes the rest. Later segment
    files are removed; returns the segments kept."""
    kept: dict[str, list[Segment]] = {}
    for split, segs in done.items():
        n = next((i for i, seg in enumerate(segs) if seg.rejects), len(segs))
        kept[split] = segs[:n]
        for seg in segs[n:]:
            segment_path(out, split, seg.seq).unlink(missing_ok=True)
    return kept


def mark_failed(out: Path, reason: str) -> None:
    write_json_atomic(out / STATE_DIR / FAILED_FILE, {"reason": reason})


def clear_failed(out: Path) -> None:
    """A rerun has started: if it is killed now, its state is a killed run's again."""
    (out / STATE_DIR / FAILED_FILE).unlink(missing_ok=True)


def failed_run(out: Path) -> bool:
    """Whether OUT's resume state is that of a run that finished and failed (not of a killed run)."""
    return (out / STATE_DIR / FAILED_FILE).is_file()


def part_dir(out: Path, k: int, n: int) -> Path:
    return out / PARTS_DIR / f"part-{k:04d}-of-{n:04d}"


def mark_part_complete(folder: Path, fingerprint: str, k: int, n: int) -> None:
    write_json_atomic(folder / STATE_DIR / PART_DONE_FILE, {"fingerprint": fingerprint, "part": k, "parts": n})


def part_status(out: Path) -> tuple[int, dict[int, str | None]]:
    """(N, {K: plan fingerprint of a complete part K, or None while it is not complete}) for OUT's parts;
    ValueError with a one-line reason when OUT holds no parts or parts of different N."""
    folder = out / PARTS_DIR
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    counts = {name.rsplit("-of-", 1)[-1] for name in names if name.startswith("part-")}
    if not counts:
        raise ValueError(f"{out}: holds no parts of a partitioned ingest (ingest build-shards --part K/N)")
    if len(counts) > 1:
        raise ValueError(f"{folder}: holds parts of {' and '.join(sorted(counts))} (--part K/N with one N only)")
    n = int(counts.pop())
    status: dict[int, str | None] = {}
    for k in range(n):
        try:
            done = json.loads((part_dir(out, k, n) / STATE_DIR / PART_DONE_FILE).read_text())
            status[k] = done["fingerprint"] if (done["part"], done["parts"]) == (k, n) else None
        except (OSError, ValueError, KeyError, TypeError):
            status[k] = None
    return n, status
