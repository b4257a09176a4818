"""Bounded load test against a real `python -m serve` on 127.0.0.1: 500 uploads, 16 in flight, zero errors;
prints p50 / p95 latency and throughput (timings on a shared CPU are indicative only)."""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = pytest.mark.slow
REQUESTS, CONCURRENCY = 500, 16


def test_load_500_requests_16_concurrent(tmp_path):
    httpx = pytest.importorskip("httpx")
    from PIL import Image

    from bundlegen import make_bundle, running_server
    bundle = make_bundle(tmp_path)
    rng = np.random.default_rng(0)
    films = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray((rng.random((300 + 10 * i, 400)) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        films.append(buf.getvalue())
    with running_server(bundle, "--neighbours", str(tmp_path / "shards")) as url:
        client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=CONCURRENCY))

        def one(i: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            r = client.post(url + "/api/predict", files={"file": ("x.jpg", films[i % len(films)], "image/jpeg")})
            ok = r.status_code == 200 and len(r.json()["findings"]) > 0
            return (200 if ok else r.status_code), time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, range(REQUESTS)))
        wall = time.perf_counter() - t0
        assert client.get(url + "/api/health").status_code == 200
        client.close()
    codes = [c for c, _ in results]
    lat_ms = np.array([s for _, s in results]) * 1000
    p50, p95 = np.percentile(lat_ms, [50, 95])
    print(f"\nserve load: {REQUESTS} requests, {CONCURRENCY} concurrent, errors {sum(c != 200 for c in codes)}, "
          f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {lat_ms.max():.0f} ms, {REQUESTS / wall:.1f} req/s")
    assert codes == [200] * REQUESTS
