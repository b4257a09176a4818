"""The serve API in-process (FastAPI TestClient): predictions, bad uploads answered with 4xx while the app keeps
serving, token checks, uploads kept in memory, DICOM headers never echoed, and the command-line guards."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TOKEN = "t" * 24


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from bundlegen import make_bundle
    return make_bundle(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def predictor(bundle):
    from eval.bundle import load_bundle
    from eval.predict import Predictor
    return Predictor(load_bundle(bundle))


@pytest.fixture(scope="module")
def client(predictor, bundle):
    from fastapi.testclient import TestClient

    from serve.app import ServeConfig, create_app
    from serve.neighbours import NeighbourIndex
    index = NeighbourIndex.build(predictor, bundle.parent / "shards", log=lambda m: None)
    return TestClient(create_app(predictor, ServeConfig(max_upload_bytes=8 << 20, k=3), index))


def _png(shape=(120, 100), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((200, 160)) * 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def png_bomb(side: int = 20000) -> bytes:
    """A valid 8-bit gray PNG of side x side black pixels, a few hundred kB compressed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    z = zlib.compressobj(1)
    rows = b"\x00" * ((side + 1) * 100)
    idat = b"".join(z.compress(rows) for _ in range(side // 100)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def dicom_without_pixels() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName, ds.PatientID = "Doe^Jane", "SECRET-ID-42"
    ds.Rows, ds.Columns, ds.PhotometricInterpretation = 512, 512, "MONOCHROME2"
    ds.preamble = b"\x00" * 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _post(client, data: bytes, name: str = "x.png", **kw):
    return client.post("/api/predict", files={"file": (name, data, "application/octet-stream")}, **kw)


def test_health_and_page(client):
    r = client.get("/api/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["neighbours"] > 0
    page = client.get("/")
    assert page.status_code == 200 and "Research software, not a diagnosis" in page.text
    assert page.headers["x-content-type-options"] == "nosniff" \
        and "default-src 'self'" in page.headers["content-security-policy"]


def test_predict_png_jpeg(client, predictor):
    tasks = predictor.bundle.tasks
    for data in (_png(), _jpeg()):
        r = _post(client, data)
        assert r.status_code == 200, r.text
        j = r.json()
        assert [f["name"] for f in j["findings"]] == tasks
        for f in j["findings"]:
            assert 0 <= f["probability"] <= 1
            if f["validated"]:
                assert f["above_threshold"] == (f["probability"] >= f["threshold"])
            else:  # no threshold from a chance-level validation curve: no reading either way
                assert f["threshold"] is None and f["above_threshold"] is None
        assert any(f["validated"] for f in j["findings"])  # the seeded test bundle has one validated task
        assert j["image"].startswith("data:image/png;base64,") and set(j["saliency"]) == set(tasks)
        assert len(j["neighbours"]) == 3 and set(j["neighbours"][0]["labels"]) == set(tasks)
        sims = [n["similarity"] for n in j["neighbours"]]
        assert sims == sorted(sims, reverse=True) and "not a medical device" in j["notice"]


def test_same_image_same_answer_as_batch_predict(client, predictor):
    data = _png(seed=5)
    r = _post(client, data).json()
    direct = predictor.predict(predictor.prepare(data)[None]).probs[0]
    assert np.allclose([f["probability"] for f in r["findings"]], direct, atol=1e-6)


def _strip() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (20000, 1)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["truncated_jpeg", "text_as_png", "png_bomb", "dicom_no_pixels", "empty",
                                  "not_multipart", "too_big", "strip"])
def test_bad_uploads_get_4xx_and_server_keeps_serving(client, case):
    if case == "not_multipart":
        r = client.post("/api/predict", content=b"hello", headers={"content-type": "text/plain"})
    else:
        data = {"truncated_jpeg": lambda: _jpeg()[:600], "text_as_png": lambda: b"just some notes\n" * 10,
                "png_bomb": png_bomb, "dicom_no_pixels": dicom_without_pixels, "empty": lambda: b"",
                "too_big": lambda: b"\xff\xd8\xff" + b"\x00" * (9 << 20), "strip": _strip}[case]()
        r = _post(client, data)
    expected = {"truncated_jpeg": 422, "text_as_png": 415, "png_bomb": 413, "dicom_no_pixels": 422, "empty": 400,
                "not_multipart": 415, "too_big": 413, "strip": 422}[case]
    assert r.status_code == expected, r.text
    msg = r.json()["error"]
    assert msg and "\n" not in msg and "SECRET" not in msg and "Doe" not in msg
    assert client.get("/api/health").status_code == 200
    assert _post(client, _png()).status_code == 200


def test_token_checked_on_every_request(predictor):
    from fastapi.testclient import TestClient

    from serve.app import ServeConfig, create_app
    c = TestClient(create_app(predictor, ServeConfig(token=TOKEN)))
    for path in ("/", "/app.js", "/api/health"):
        assert c.get(path).status_code == 401
    assert _post(c, _png()).status_code == 401
    assert c.get("/api/health", headers={"x-token": "wrong" * 5}).status_code == 401
    assert c.get("/api/health", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert _post(c, _png(), headers={"x-token": TOKEN}).status_code == 200
    # The page opened with ?token= sets an HttpOnly cookie that its own requests then carry.
    page = c.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "httponly" in page.headers["set-cookie"].lower()
    assert c.get("/api/health").status_code == 200


def test_uploads_never_touch_disk(client, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise AssertionError("an upload was spooled to a temporary file")
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    big = _png((1800, 1500), seed=2)
    assert len(big) > 1 << 20
    assert _post(client, big).status_code == 200


@pytest.mark.skipif(not (SHARED / "formats").is_dir(), reason="../shared/data/formats absent (real DICOMs)")
def test_real_dicom_headers_never_echoed(client):
    import pydicom
    for path in sorted((SHARED / "formats").glob("*.dcm")):
        data = path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        r = _post(client, data, name="x.dcm")
        assert r.status_code == 200, r.text
        secrets = [str(ds.get(t, "")) for t in ("PatientName", "PatientID", "StudyDate", "InstitutionName",
                                                "AccessionNumber")]
        for s in secrets:
            if len(s) >= 4:
                assert s not in r.text


def test_cli_guards(bundle, capsys):
    from serve.__main__ import main
    assert main(["--bundle", str(bundle), "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["--bundle", str(bundle), "--host", "0.0.0.0", "--token", "short"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["--bundle", str(bundle.parent / "nope")]) == 2
    assert "not a bundle" in capsys.readouterr().err


def test_predict_and_serve_refuse_corrupt_films_like_ingest(shared_data, bundle, client, tmp_path):
    """Real films cut short (end marker appended or not) or with forged headers: `eval predict` lists each as an
    error with ingest's reason, serve answers 422 with the same one-line reason; the originals are scored."""
    import csv

    from eval.__main__ import main as eval_main
    from test_corrupt_films import corrupt_films
    films = corrupt_films(shared_data)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, (data, _) in films.items():
        (inputs / name).write_bytes(data)
    out = tmp_path / "preds.csv"
    assert eval_main(["predict", "--bundle", str(bundle), "--input", str(inputs), "--out", str(out),
                      "--no-progress"]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out))}
    for name, (data, reason) in films.items():
        r = _post(client, data, name=name)
        if reason is None:
            assert rows[name]["status"] == "ok" and r.status_code == 200, (name, rows[name], r.text)
            continue
        assert rows[name]["status"] == "error" and reason in rows[name]["reason"], (name, rows[name])
        assert r.status_code == 422, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert reason in error and "\n" not in error and "findings" not in r.json(), (name, error)


def test_decode_cap_answers_503_with_retry_after(predictor):
    """With the only decode slot held, a request waits at most max_wait_s, then gets 503 + Retry-After and a
    one-line JSON error; with the queue full it is refused at once; after the release it is answered."""
    from fastapi.testclient import TestClient

    from serve.app import ServeConfig, create_app
    app = create_app(predictor, ServeConfig(max_decodes=1, max_queued=1, max_wait_s=0.3))
    client, gate = TestClient(app), app.state.gate
    assert gate.try_acquire()
    try:
        r = client.post("/api/predict", files={"file": ("x.png", _png(), "image/png")})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "no decode slot" in r.json()["error"] and "\n" not in r.json()["error"]
        gate.queued = gate.max_queued  # the queue is full: refused before the upload is read
        r = client.post("/api/predict", files={"file": ("x.png", _png(), "image/png")})
        assert r.status_code == 503 and "queued" in r.json()["error"] and r.headers["retry-after"]
        gate.queued = 0
    finally:
        gate.release()
    r = client.post("/api/predict", files={"file": ("x.png", _png(), "image/png")})
    assert r.status_code == 200 and gate.queued == 0 and gate.try_acquire()
    gate.release()


def test_sixteen_bit_pixel_counts_twice_against_the_limit():
    from eval.predict import InputError, decode_gray
    buf = io.BytesIO()
    Image.fromarray(np.zeros((300, 400), np.uint16)).save(buf, format="PNG")
    data = buf.getvalue()
    assert decode_gray(data, shard_size=64, quality=90, max_pixels=240_000).shape == (64, 85)
    with pytest.raises(InputError, match="16-bit pixels exceeds .* at 16 bits") as e:
        decode_gray(data, shard_size=64, quality=90, max_pixels=239_999)
    assert e.value.kind == "too_large"


def test_bench_serve_smoke(bundle, tmp_path):
    """`python -m bench serve` end to end with a few uploads: every answer 200, RSS figures and a JSON written."""
    import json

    from bench.__main__ import main as bench_main
    out = tmp_path / "serve.json"
    assert bench_main(["serve", "--bundle", str(bundle), "--clients", "2", "--uploads", "3", "--settle-s", "0.2",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    total = doc["rows"][-1]
    assert total["kind"] == "all" and total["requests"] == 6 and total["errors"] == 0
    assert {r["kind"] for r in doc["rows"][:-1]} == {"jpeg8", "png16", "dicom"}
    assert 0 < total["rss_start_mb"] <= total["peak_rss_mb"] and total["p95_ms"] >= total["p50_ms"] > 0
