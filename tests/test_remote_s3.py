"""s3:// shard locations against a local S3-compatible server (moto, on 127.0.0.1, started here): `ingest build-shards
--out s3://` uploads manifest-last, the trainer and `python -m eval knn` stage and read the shards, a corrupt object
is refused in one line, a killed download resumes, and the credentials appear in no file and no output."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("boto3", reason="boto3 not installed (pip install 'cxr-ssl[s3]')")
moto_server = pytest.importorskip("moto.server", reason="moto not installed (pip install 'moto[server]')")

from ingest import remote  # noqa: E402 - after the skips

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "trainer" / "configs" / "debug_cpu.toml")
# Recognisable fake credentials: the tests look for them in every file and every output line.
KEY_ID, SECRET = "AKIACXRSSLTESTKEY000", "cxr-ssl-test-secret-d6f1c0ffee"
BUCKET = "cxr-test-bucket"


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines in the test output
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("AWS_ACCESS_KEY_ID", KEY_ID), ("AWS_SECRET_ACCESS_KEY", SECRET),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            mp.setenv(name, value)
        mp.setenv("AWS_ENDPOINT_URL", url)  # the default for every client here: nothing reaches the internet
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        remote.client(url).create_bucket(Bucket=BUCKET)
        yield url
    server.stop()


@pytest.fixture
def tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from shardgen import make_shards
    return make_shards(tmp_path / "shards", num_patients=12)


def _no_secret_in(*texts_or_folders) -> None:
    for item in texts_or_folders:
        if isinstance(item, Path):
            for path in item.rglob("*"):
                if path.is_file():
                    data = path.read_bytes()
                    assert KEY_ID.encode() not in data and SECRET.encode() not in data, path
        else:
            assert KEY_ID not in item and SECRET not in item


class Recording:
    """The real client, with every object request noted (key, and the Range header of a get)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls.append((name, kwargs.get("Key"), kwargs.get("Range")))
            return fn(*args, **kwargs)
        if name == "upload_file":  # (path, bucket, key)
            return lambda path, bucket, key, **kw: (self.calls.append((name, key, None)), fn(path, bucket, key, **kw))
        return call


def _recording(monkeypatch) -> list:
    calls: list = []
    real = remote.client

    def make(endpoint=None):
        rec = Recording(real(endpoint))
        rec.calls = calls
        return rec
    monkeypatch.setattr(remote, "client", make)
    return calls


def test_locations_and_the_cache_key(tmp_path, monkeypatch):
    assert remote.parse_location("s3://bkt/a/b/") == ("bkt", "a/b")
    assert remote.parse_location("s3://bkt") == ("bkt", "")
    for bad in ("s3://", "s3:///x", "s3://bkt/a//b", "s3://bkt/../x", "/local/folder"):
        with pytest.raises(remote.RemoteError):
            remote.parse_location(bad)
    monkeypatch.setenv("CXR_SSL_CACHE", str(tmp_path / "c"))
    assert remote.cache_folder("s3://bkt/a/b") == tmp_path / "c" / "shards" / "bkt" / "a" / "b"
    assert remote.cache_folder("s3://bkt/a", tmp_path / "mine") == tmp_path / "mine" / "bkt" / "a"
    assert remote.location_arg("s3://bkt/a") == "s3://bkt/a" and remote.location_arg("x/y") == Path("x/y")


def test_missing_boto3_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(remote.RemoteError, match=r"pip install 'cxr-ssl\[s3\]'") as e:
        remote.stage("s3://bkt/x")
    assert "\n" not in str(e.value)


def test_upload_is_manifest_last_and_stage_matches_bytes(endpoint, tiny, tmp_path, monkeypatch):
    calls = _recording(monkeypatch)
    uri = f"s3://{BUCKET}/tiny/v1"
    remote.upload(tiny, uri, endpoint=endpoint, progress=False, log=lambda m: None)
    writes = [key for name, key, _ in calls if name in ("upload_file", "put_object")]
    assert writes[-1] == "tiny/v1/manifest.json" and len(writes) == len(set(writes))
    assert {w.removeprefix("tiny/v1/") for w in writes} >= {"train/shard-000000.tar", "train/shard-000000.idx"}
    calls.clear()  # a second upload of the same build sends nothing
    remote.upload(tiny, uri, endpoint=endpoint, progress=False, log=lambda m: None)
    assert not [c for c in calls if c[0] in ("upload_file", "put_object")]
    # another build under the same prefix is refused without --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**json.loads((tiny / "manifest.json").read_text()), "x": 1}))
    with pytest.raises(remote.RemoteError, match="pass --overwrite"):
        remote.upload(other, uri, endpoint=endpoint, progress=False, log=lambda m: None)

    folder = remote.stage(uri, tmp_path / "cache", endpoint=endpoint, progress=False, log=lambda m: None)
    assert folder == tmp_path / "cache" / BUCKET / "tiny" / "v1"
    for src in tiny.rglob("*"):
        if src.is_file():
            assert (folder / src.relative_to(tiny)).read_bytes() == src.read_bytes(), src
    calls.clear()  # staged again: only the manifest is asked for, no shard is fetched or re-hashed
    assert remote.stage(uri, tmp_path / "cache", endpoint=endpoint, progress=False) == folder
    assert [(n, k) for n, k, _ in calls] == [("get_object", "tiny/v1/manifest.json")]


def test_corrupt_object_is_refused_and_nothing_of_it_used(endpoint, tiny, tmp_path, capsys):
    uri = f"s3://{BUCKET}/corrupt"
    remote.upload(tiny, uri, endpoint=endpoint, progress=False, log=lambda m: None)
    good = (tiny / "train" / "shard-000001.tar").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0xFF  # same size, one byte flipped
    remote.client(endpoint).put_object(Bucket=BUCKET, Key="corrupt/train/shard-000001.tar", Body=bytes(bad))
    cache = tmp_path / "cache"
    with pytest.raises(remote.RemoteError) as e:
        remote.stage(uri, cache, endpoint=endpoint, progress=False, log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and "corrupt/train/shard-000001.tar" in msg and "sha256" in msg
    folder = cache / BUCKET / "corrupt"
    assert not (folder / "manifest.json").exists()  # the cache folder is no shard folder
    assert not (folder / "train" / "shard-000001.tar").exists()
    assert not list(folder.rglob("*.part"))

    from trainer.pretrain import main  # the trainer says the same in one line and exits 2
    rc = main([DEBUG, f"data.shards={uri}", f"data.shards_cache={cache}", f"run.out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "sha256" in err[-1] and err[-1].startswith("pretrain: s3://"), err
    assert err[0].startswith("staging ") and len(err) == 2 and not any("Traceback" in line for line in err), err
    assert not (tmp_path / "run").exists()


def test_killed_download_resumes_where_it_stopped(endpoint, tiny, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/resume"
    remote.upload(tiny, uri, endpoint=endpoint, progress=False, log=lambda m: None)
    monkeypatch.setattr(remote, "CHUNK_BYTES", 4096)
    target = "train/shard-000001.tar"
    real_write = remote._download

    def dies_mid_shard(s3, bucket, key, part, num_bytes, bar):
        if key.endswith(target):
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            with open(part, "ab") as f:
                f.write(next(body.iter_chunks(4096)))  # a first chunk lands, then the process is gone
            raise KeyboardInterrupt
        return real_write(s3, bucket, key, part, num_bytes, bar)
    monkeypatch.setattr(remote, "_download", dies_mid_shard)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        remote.stage(uri, cache, endpoint=endpoint, progress=False, log=lambda m: None)
    folder = cache / BUCKET / "resume"
    assert (folder / "train" / "shard-000000.tar").is_file()  # verified before the kill
    assert (folder / (target + ".part")).stat().st_size == 4096 and not (folder / target).exists()
    assert not (folder / "manifest.json").exists()

    monkeypatch.setattr(remote, "_download", real_write)
    calls = _recording(monkeypatch)
    remote.stage(uri, cache, endpoint=endpoint, progress=False, log=lambda m: None)
    gets = {k.removeprefix("resume/"): r for n, k, r in calls if n == "get_object"}
    assert gets[target] == "bytes=4096-"  # continued, not restarted
    assert "train/shard-000000.tar" not in gets  # verified shards are kept
    assert (folder / target).read_bytes() == (tiny / target).read_bytes()
    assert not list(folder.rglob("*.part")) and (folder / "manifest.json").is_file()


def test_real_films_to_s3_then_trainer_and_eval_read_them(shared_data, endpoint, tmp_path, monkeypatch, capfd):
    """Real radiographs (pneumonia-mini, linked) -> `ingest build-shards --out s3://` -> 2 SimCLR steps with
    data.shards=s3:// (endpoint from AWS_ENDPOINT_URL) -> `eval knn` with --shards s3:// (--s3-endpoint)."""
    from ingest.cli import main as ingest_main
    root = tmp_path / "root"
    for cls in ("Normal", "ViralPneumonia"):
        (root / cls).mkdir(parents=True)
        for src in sorted((shared_data / "pneumonia-mini" / cls).iterdir())[:14]:
            (root / cls / src.name).symlink_to(src)
    # ingest and eval get the endpoint from --s3-endpoint (the environment's points at a closed local port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    uri, staging, cache = f"s3://{BUCKET}/real/v1", tmp_path / "staging", tmp_path / "cache"
    argv = ["build-shards", "--source", "folder", "--root", str(root), "--out", uri, "--staging", str(staging),
            "--s3-endpoint", endpoint, "--size", "48", "--split-mode", "hash", "--val-frac", "0.25",
            "--test-frac", "0.25", "--workers", "0", "--no-progress", "--salt-file", str(tmp_path / "salt")]
    assert ingest_main(argv) == 0, capfd.readouterr().err
    listed = remote.client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix="real/v1/")["Contents"]
    manifest = json.loads((staging / "manifest.json").read_text())
    assert {o["Key"] for o in listed} >= {"real/v1/manifest.json", "real/v1/train/shard-000000.tar"}
    assert manifest["counts"]["written"] == 28
    assert ingest_main(argv) == 0  # the same command again: the finished build is reused, nothing re-sent
    assert "nothing to upload" in capfd.readouterr().out

    from trainer.pretrain import main as pretrain_main
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    run = tmp_path / "run"
    rc = pretrain_main([DEBUG, f"data.shards={uri}", f"data.shards_cache={cache}", f"run.out={run}",
                        "optim.total_steps=2", "data.batch_size=4", "run.monitor_every=0"])
    assert rc == 0, capfd.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert f'shards = "{uri}"' in (run / "config.toml").read_text()  # the location, not the cache, is recorded
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")

    from eval.__main__ import main as eval_main
    out = tmp_path / "eval"
    rc = eval_main(["knn", "--shards", uri, "--shards-cache", str(cache), "--s3-endpoint", endpoint, "--out",
                    str(out), "--arch", "resnet18", "--image-size", "32", "--resize-size", "36", "--batch-size", "8",
                    "--bootstrap", "20", "--init", "random", "--device", "cpu", "--k", "3"])
    assert rc == 0, capfd.readouterr().err
    result = json.loads((out / "knn" / "random-resnet18.json").read_text())
    assert result["shards"] == uri  # the location, not the cache folder
    captured = capfd.readouterr()
    _no_secret_in(captured.out, captured.err, staging, cache, run, out, tmp_path / "salt")
