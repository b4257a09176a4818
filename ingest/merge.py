"""`ingest merge OUT`: once every part of `ingest build-shards --part K/N` is complete, cut the parts' encoded
samples into the shards one run would write and write indexes, patient table, rejects and manifest: the same
bytes as `ingest build-shards` without --part. Nothing is decoded again; a killed merge resumes."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ingest.build import (BuildError, BuildOptions, SplitWriter, build_parser, clean_partial_files, finish,
                          plan_run, start_resumable, write_results)
from ingest.plan import Plan
from ingest.schema import COMPONENTS, INDEX_SUFFIX, MANIFEST_NAME, SPLITS, read_dali_index
from ingest.shards import EncodedSample, tar_member_bytes
from ingest.sources import SourceError
from ingest.state import PART_ARGS_FILE, PARTS_DIR, STATE_DIR, Segment, load_segments, part_dir, part_status
from ingest.workers import TaskResult

_HEADER_BYTES = tar_member_bytes(0)


def _fail(out: Path, parts: list[int], n: int, why: str) -> BuildError:
    listed = ", ".join(map(str, parts[:10])) + (", ..." if len(parts) > 10 else "")
    return BuildError(f"{out}: part{'s' if len(parts) > 1 else ''} {listed} of {n} {why}; run `ingest build-shards "
                      f"... --part K/{n}` for {'each' if len(parts) > 1 else 'it'} (a killed part resumes), then "
                      f"merge again")


def part_options(out: Path, n: int, workers: int | None, no_progress: bool) -> BuildOptions:
    """The options the parts were run with (part 0's arguments), relative paths taken from its working folder."""
    try:
        saved = json.loads((part_dir(out, 0, n) / STATE_DIR / PART_ARGS_FILE).read_text())
        argv, cwd = list(saved["argv"]), Path(saved["cwd"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BuildError(f"{part_dir(out, 0, n)}: unreadable part arguments ({e}); rerun part 0") from None
    o = BuildOptions.from_args(build_parser().parse_args(argv))

    def absolute(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else cwd / p
    return replace(o, out=out, root=absolute(o.root) or o.root, labels_csv=absolute(o.labels_csv) or o.labels_csv,
                   salt_file=absolute(o.salt_file) or o.salt_file,
                   private_log=absolute(o.private_log) or o.private_log,
                   workers=o.workers if workers is None else workers, no_progress=no_progress, overwrite=False,
                   part=None)


def part_segments(out: Path, n: int, plan: Plan) -> dict[str, list[tuple[Path, Segment]]]:
    """Every part's verified segments per split, in plan order, covering each split whole; BuildError naming
    the parts whose segments are missing or damaged (their state is trimmed so a rerun redoes just that)."""
    by_split: dict[str, list[tuple[Path, Segment]]] = {s: [] for s in SPLITS}
    short = []
    for k in range(n):
        folder, ranges = part_dir(out, k, n), plan.part_ranges(k, n)
        done = load_segments(folder, plan.order, ranges)
        if any((done[s][-1].plan_end if done[s] else start) != end for s, (start, end) in ranges.items()):
            short.append(k)
        for s in SPLITS:
            by_split[s] += [(folder, seg) for seg in done[s]]
    if short:
        raise _fail(out, short, n, "lack verified shards (damaged or removed since they completed)")
    return by_split


def read_encoded_samples(tar: Path, keys: list[str]) -> list[EncodedSample]:
    """A part's shard back as the encoded samples it was written from (tar blocks are copied, not re-encoded)."""
    data = tar.read_bytes()
    entries = read_dali_index(tar.with_suffix(INDEX_SUFFIX))
    if len(entries) != len(keys):
        raise BuildError(f"{tar}: {len(entries)} samples indexed, the plan has {len(keys)} there; rerun its part")
    samples = []
    for key, entry in zip(keys, entries):
        begin = entry[COMPONENTS[0]][0] - _HEADER_BYTES
        last_at, last_size = entry[COMPONENTS[-1]]
        blob = data[begin:last_at - _HEADER_BYTES + tar_member_bytes(last_size)]
        if not blob.startswith(f"{key}.{COMPONENTS[0]}\0".encode()):
            raise BuildError(f"{tar}: does not hold {key} where the plan puts it; rerun its part")
        samples.append(EncodedSample(key, blob, [(ext, entry[ext][0] - begin, entry[ext][1], f"{key}.{ext}")
                                                 for ext in COMPONENTS]))
    return samples


def part_results(plan: Plan, segments: dict[str, list[tuple[Path, Segment]]], todo: list) -> Iterator[TaskResult]:
    """What the decode workers returned to the parts, one per ``todo`` entry, in order: samples read back from
    the parts' shards, rejects from their segments."""
    where: dict[str, int] = {s: 0 for s in SPLITS}   # next segment of each split
    loaded: dict[str, tuple[Segment, dict, Iterator[EncodedSample]]] = {}
    for seq, (split, i, rec) in enumerate(todo):
        cur = loaded.get(split)
        if cur is None or not cur[0].plan_start <= i < cur[0].plan_end:
            while segments[split][where[split]][1].plan_end <= i:
                where[split] += 1
            folder, seg = segments[split][where[split]]
            rejects = {x.key: x for x in seg.rejects}
            keys = [r.key for r in plan.order[split][seg.plan_start:seg.plan_end] if r.key not in rejects]
            tar = folder / split / seg.shard["name"] if seg.shard else None
            cur = loaded[split] = (seg, rejects, iter(read_encoded_samples(tar, keys) if tar else []))
        seg, rejects, samples = cur
        if rec.key in rejects:
            yield TaskResult(seq, None, rejects[rec.key])
        else:
            yield TaskResult(seq, next(samples), None)


def merge(out: Path, workers: int | None = None, no_progress: bool = False) -> int:
    if (out / MANIFEST_NAME).is_file():
        raise BuildError(f"{out}: holds a finished ingest (manifest.json); nothing to merge")
    try:
        n, status = part_status(out)
    except ValueError as e:
        raise BuildError(str(e)) from None
    missing = [k for k, fingerprint in status.items() if fingerprint is None]
    if missing:
        raise _fail(out, missing, n, "not complete")
    r = plan_run(part_options(out, n, workers, no_progress))
    o, plan = r.options, r.plan
    other = [k for k, fingerprint in status.items() if fingerprint != plan.fingerprint]
    if other:
        raise _fail(out, other, n, "were made from other arguments or inputs than part 0's arguments and the "
                                   "inputs now")
    segments = part_segments(out, n, plan)
    start_resumable(out, plan, overwrite=False, what="merge")
    done = load_segments(out, plan.order)
    clean_partial_files(out, done)
    writers = {s: SplitWriter(out, s, done[s], o.shard_max_bytes, o.shard_max_samples) for s in SPLITS}
    todo = [(s, i, plan.order[s][i]) for s in SPLITS for i in range(writers[s].pos, len(plan.order[s]))]
    write_results(o, plan, writers, todo, part_results(plan, segments, todo), plan.num_planned)
    code = finish(r, writers)
    if (out / MANIFEST_NAME).is_file():  # merged: the parts are now the shards
        shutil.rmtree(out / PARTS_DIR)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ingest merge", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the --out of the parts (holding .ingest-parts/)")
    p.add_argument("--workers", type=int, help="processes reading the source again (dicom headers; default: the "
                                               "parts' --workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        return merge(a.out, a.workers, a.no_progress)
    except (BuildError, SourceError) as e:
        print(f"ingest merge: {e}", file=sys.stderr)
        return 2
