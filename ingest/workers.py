"""Decode workers: a typed task per sample, a worker that turns it into an encoded sample or a reject, and a
guarded pool whose children each hold one task at a time, so a child that dies (a segfaulting decoder) or
overruns the per-file timeout costs exactly that task a reject and is replaced. Results come in task order."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from ingest.preprocess import ImageReject, Processed, process_bytes, read_bytes
from ingest.records import Reject
from ingest.shards import EncodedSample, encode_sample


@dataclass(frozen=True)
class SampleTask:
    """One planned sample: its file, and every metadata field known before decoding."""
    seq: int                    # position in this run's task stream (results are yielded in this order)
    rel_path: str               # relative to --root
    kind: str                   # "image" | "dicom"
    key: str
    meta: dict
    lbl: bytes
    pid: bytes

    def rejected(self, reason: str, sha256: str = "") -> TaskResult:
        return TaskResult(self.seq, None, Reject(self.rel_path, reason, sha256, self.key))


@dataclass(frozen=True)
class TaskResult:
    seq: int
    sample: EncodedSample | None
    reject: Reject | None       # why there is no sample


def make_sample(task: SampleTask, p: Processed) -> dict[str, bytes]:
    meta = {**task.meta, "source_sha256": p.source_sha256, "original_width": p.original_width,
            "original_height": p.original_height, "original_bit_depth": p.original_bit_depth,
            "photometric_interpretation": p.photometric_interpretation, "preprocessing": p.steps,
            "flags": {**task.meta["flags"], **p.flags}}
    return {"__key__": task.key, "jpg": p.jpeg,
            "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(), "lbl": task.lbl, "pid": task.pid}


@dataclass(frozen=True)
class SampleWorker:
    """Read, decode, resize, encode one task; never raises for bad input (the reason is the result)."""
    root: Path
    size: int
    quality: int

    def __call__(self, task: SampleTask) -> TaskResult:
        try:
            data = read_bytes(self.root / task.rel_path)
        except ImageReject as e:
            return task.rejected(str(e))
        sha = hashlib.sha256(data).hexdigest()
        try:
            p = process_bytes(data, task.kind, self.size, self.quality)
        except ImageReject as e:
            return task.rejected(str(e), sha)
        except Exception as e:  # bad input must never stop the run; the reason names the failure
            return task.rejected(f"decoding failed ({type(e).__name__}: {e})", sha)
        return TaskResult(task.seq, encode_sample(make_sample(task, p)), None)


def _child(conn, worker: SampleWorker) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(worker(task))


@dataclass
class _Slot:
    proc: mp.process.BaseProcess
    conn: object
    task: SampleTask | None = None
    started_s: float = 0.0


class GuardedPool:
    """`processes` children; `imap(tasks)` yields one TaskResult per task, in task order."""

    def __init__(self, worker: SampleWorker, processes: int, timeout_s: float, window: int = 0):
        self.worker, self.timeout_s = worker, timeout_s
        self.ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.window = window or 8 * processes   # most results held ahead of the one the caller waits for
        self.slots = [self._spawn() for _ in range(processes)]

    def _spawn(self) -> _Slot:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_child, args=(child, self.worker), daemon=True)
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def _replace(self, slot: _Slot, reason: str) -> TaskResult:
        task = slot.task
        if slot.proc.is_alive():
            slot.proc.kill()
        slot.proc.join()
        slot.conn.close()
        fresh = self._spawn()
        slot.proc, slot.conn, slot.task = fresh.proc, fresh.conn, None
        return task.rejected(reason)

    def _death_reason(self, slot: _Slot) -> str:
        slot.proc.join(timeout=5)
        code = slot.proc.exitcode
        if code is not None and code < 0:
            try:
                return f"decoder process killed by {signal.Signals(-code).name} while reading this file"
            except ValueError:
                pass
        return f"decoder process died (exit code {code}) while reading this file"

    def imap(self, tasks: Iterable[SampleTask]) -> Iterator[TaskResult]:
        it = iter(tasks)
        done: dict[int, TaskResult] = {}
        next_seq, sent, exhausted = None, 0, False
        while True:
            for slot in self.slots:  # keep every idle child busy, within the reorder window
                if slot.task is None and not exhausted and len(done) + self._busy() < self.window:
                    task = next(it, None)
                    if task is None:
                        exhausted = True
                        break
                    if next_seq is None:
                        next_seq = task.seq
                    slot.task, slot.started_s = task, time.monotonic()
                    slot.conn.send(task)
                    sent += 1
            while next_seq is not None and next_seq in done:
                yield done.pop(next_seq)
                next_seq += 1
            if exhausted and self._busy() == 0 and not done:
                return
            busy = [s for s in self.slots if s.task is not None]
            if not busy:
                continue
            now = time.monotonic()
            wait_s = max(0.0, min(s.started_s + self.timeout_s - now for s in busy))
            ready = wait([x for s in busy for x in (s.conn, s.proc.sentinel)], timeout=wait_s)
            for slot in busy:
                if slot.conn in ready or slot.proc.sentinel in ready:
                    try:
                        result = slot.conn.recv()
                    except (EOFError, OSError):
                        result = self._replace(slot, self._death_reason(slot))
                    else:
                        slot.task = None
                    done[result.seq] = result
                elif time.monotonic() - slot.started_s > self.timeout_s:
                    result = self._replace(slot, f"decoding took longer than --file-timeout-s {self.timeout_s:g}")
                    done[result.seq] = result

    def _busy(self) -> int:
        return sum(s.task is not None for s in self.slots)

    def close(self) -> None:
        for slot in self.slots:
            if slot.proc.is_alive():
                slot.proc.kill()
            slot.proc.join()
            slot.conn.close()
