"""The decode gate and the wide-pixel conversion: first come first served with the slot handed over on release,
a bounded wait, and a 16-bit PNG decoded within a memory bound (an RSS high-water mark in a fresh process)."""
from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_gate_first_come_first_served_then_busy():
    from serve.gate import Busy, DecodeGate

    async def scenario():
        gate = DecodeGate(1, max_queued=4, max_wait_s=5)
        await gate.acquire()
        order = []

        async def waiter(i):
            await gate.acquire()
            order.append(i)
            gate.release()
        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert order == []  # all three wait on the held slot
        gate.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2] and gate.try_acquire()
        gate.max_wait_s = 0.05
        with pytest.raises(Busy) as e:
            await gate.acquire()
        assert e.value.retry_after_s >= 1 and not gate._waiters  # a timed-out waiter leaves the line
        gate.release()
        assert gate.try_acquire()
    asyncio.run(scenario())


MEASURE = """
import sys
from eval.predict import decode_gray
data = open(sys.argv[1], 'rb').read()
decode_gray(open(sys.argv[2], 'rb').read(), shard_size=64, quality=90)  # imports and a small decode first
def status_mb(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':')) / 1024
before = status_mb('VmRSS')
gray = decode_gray(data, shard_size=256, quality=90)
print(status_mb('VmHWM') - before, gray.shape)  # VmHWM: this process's peak (ru_maxrss carries the parent's)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_16bit_png_decode_memory_bound(tmp_path):
    """A 4000 x 4000 16-bit PNG (32 MB of pixels, under the limit): the float64 conversion with its full-size
    copies peaked ~600 MB above the baseline; the table conversion holds the decoded image and the 8-bit result."""
    yy, xx = np.mgrid[0:4000, 0:4000]
    big, small = tmp_path / "big16.png", tmp_path / "small.png"
    Image.fromarray(((xx * 7 + yy * 3) % 4096 + 1000).astype(np.uint16)).save(big, format="PNG", compress_level=1)
    Image.fromarray(np.zeros((80, 64), np.uint8)).save(small, format="PNG")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(big), str(small)], capture_output=True, text=True,
                          cwd=ROOT, env=env, check=True)
    extra_mb = float(done.stdout.split()[0])
    assert "(256, 256)" in done.stdout
    assert extra_mb < 200, f"decoding a 32 MB 16-bit film raised the peak RSS by {extra_mb:.0f} MB"


def test_table_conversion_equals_float_formula():
    """The table / stripe paths give the bytes of rint((v - lo) * 255 / (hi - lo)) over the whole array."""
    from ingest.pixels import STRIPE_PIXELS, range_to_u8
    rng = np.random.default_rng(0)
    for arr in (rng.integers(300, 4096, (700, 1600), dtype=np.uint16),
                rng.integers(-5_000_000, 20_000_000, (300, 400), dtype=np.int32),
                rng.normal(0, 3, (3, STRIPE_PIXELS // 2)).astype(np.float32)):
        x = arr.astype(np.float64)
        lo, hi = x.min(), x.max()
        want = np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        np.testing.assert_array_equal(range_to_u8(arr), want)
        mode = {np.dtype(np.uint16): None, np.dtype(np.int32): "I", np.dtype(np.float32): "F"}[arr.dtype]
        im = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
        np.testing.assert_array_equal(range_to_u8(im), want)
