"""Admission for uploads: at most N decodes at once, a bounded queue in front of them with a bounded wait (then
`Busy`, answered 503 + Retry-After), and freed heap handed back to the OS after each decode."""
from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import math
import os
import threading

DEFAULT_MAX_QUEUED = 32
DEFAULT_MAX_WAIT_S = 30.0


def default_max_decodes() -> int:
    """The CPUs this process may run on: a decode is CPU-bound, more at once only adds memory."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Busy(Exception):
    """No decode slot: the queue is full or the wait ran out; ``retry_after_s`` goes into the Retry-After header."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DecodeGate:
    """A FIFO semaphore of ``slots`` decode slots plus a count of requests queued for one (reading their upload or
    waiting). Not bound to one event loop, and ``try_acquire`` / ``release`` work from any thread: tests hold
    slots from outside the server's loop."""

    def __init__(self, slots: int, max_queued: int = DEFAULT_MAX_QUEUED, max_wait_s: float = DEFAULT_MAX_WAIT_S):
        if slots < 1 or max_queued < 0 or max_wait_s <= 0:
            raise ValueError("decode slots must be >= 1, queue length >= 0 and the wait > 0 s")
        self.slots, self.max_queued, self.max_wait_s = slots, max_queued, max_wait_s
        # A decode takes ~0.1-1 s a core: a full queue drains in a few seconds on a few cores.
        self.retry_after_s = max(1, min(30, math.ceil(max_wait_s / 6)))
        self._lock = threading.Lock()
        self._free = slots
        self._waiters: collections.deque = collections.deque()  # (loop, future), served first come first
        self.queued = 0

    def enter_queue(self) -> None:
        """Take a place in the queue before the upload is read (its bytes count against the bound too)."""
        with self._lock:
            if self.queued >= self.max_queued and not (self._free > 0 and not self._waiters):
                raise Busy(f"server busy: {self.slots} decodes running and {self.queued} uploads queued; "
                           f"retry in {self.retry_after_s} s", self.retry_after_s)
            self.queued += 1

    def leave_queue(self) -> None:
        with self._lock:
            self.queued -= 1

    def try_acquire(self) -> bool:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            return False

    async def acquire(self) -> None:
        """A decode slot within ``max_wait_s``, else Busy."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return
            entry = (loop, loop.create_future())
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(entry[1], self.max_wait_s)
        except BaseException as e:  # timeout, or the client went away (cancelled)
            with self._lock:
                granted = entry not in self._waiters  # release() handed us the slot as the wait ended
                if not granted:
                    self._waiters.remove(entry)
            if granted:
                self.release()
            if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
                raise Busy(f"server busy: no decode slot within {self.max_wait_s:g} s; "
                           f"retry in {self.retry_after_s} s", self.retry_after_s) from None
            raise

    def release(self) -> None:
        """Free a slot: the longest waiter gets it (ownership passes under the lock), else it is counted free."""
        with self._lock:
            if self._waiters:
                loop, future = self._waiters.popleft()
                loop.call_soon_threadsafe(_grant, future)
                return
            self._free += 1


def _grant(future) -> None:
    if not future.done():
        future.set_result(None)


_LIBC = None


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc malloc_trim; a no-op elsewhere). A decode frees tens of MB in
    pieces below glibc's mmap threshold (which rises to 32 MB after the first large free), and each request
    thread has its own arena: without a trim the server's RSS stays at its high-water mark."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
