"""Shard folders on S3-compatible storage: an `s3://bucket/prefix` location is staged into a local cache (each shard
checked against the manifest's sha256 before it gets its final name), and a finished ingest folder is uploaded object
by object with manifest.json last. boto3 is optional (`pip install 'cxr-ssl[s3]'`) and imported only here."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

from ingest.errors import one_line
from ingest.schema import (FORMAT_VERSION, INDEX_SUFFIX, MANIFEST_NAME, REJECTS_NAME, SPLITS, ShardFormatError,
                           read_dali_index)

SCHEME = "s3://"
INSTALL_HINT = "pip install 'cxr-ssl[s3]'"
CACHE_ENV = "CXR_SSL_CACHE"  # the same root as dali_pipes' user cache for derived indexes
# Inside a staged folder: which shards were verified (name, sha256), and the lock that lets ranks stage at once.
STATE_NAME = ".staged.tsv"
LOCK_NAME = ".stage.lock"
PART_SUFFIX = ".part"
# Small files beside the shards: copied as they are (the manifest carries no checksum for them).
SIDE_FILES = ("patients.json", REJECTS_NAME, "filtered.tsv")
CHUNK_BYTES = 1 << 20
# Environment variables whose values must never reach a message (botocore errors can quote a key id).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class RemoteError(RuntimeError):
    """An S3 location that cannot be staged or written; the message is one line naming the object."""


def is_remote(location) -> bool:
    return str(location).startswith(SCHEME)


def parse_location(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ("bucket", "some/prefix"); RemoteError on anything else."""
    if not is_remote(uri):
        raise RemoteError(f"{uri}: not an s3://bucket/prefix location")
    bucket, _, prefix = uri[len(SCHEME):].partition("/")
    prefix = prefix.strip("/")
    if not bucket or (prefix and any(part in ("", ".", "..") for part in prefix.split("/"))):
        raise RemoteError(f"{uri}: expected s3://bucket/prefix (no empty, '.' or '..' parts)")
    return bucket, prefix


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cxr-ssl")


def cache_folder(uri: str, root: str | Path | None = None) -> Path:
    """Where ``uri`` is staged: ROOT/<bucket>/<prefix>, ROOT defaulting to ~/.cache/cxr-ssl/shards."""
    bucket, prefix = parse_location(uri)
    base = Path(root).expanduser() if root else cache_root() / "shards"
    return base / bucket / prefix if prefix else base / bucket


def location_arg(text: str) -> Path | str:
    """argparse type of a shard location: an s3:// URI stays a string (Path would fold its '//'), else a Path."""
    return text if is_remote(text) else Path(text)


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _scrub(text: str) -> str:
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return text


def client(endpoint: str | None = None):
    """A boto3 S3 client from the standard credential chain (environment, config files, instance role); the
    endpoint from ``endpoint``, else AWS_ENDPOINT_URL(_S3), which boto3 reads itself."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RemoteError(f"s3:// shard locations need boto3: {INSTALL_HINT}") from None
    try:
        return boto3.client("s3", endpoint_url=endpoint or None,
                            config=Config(retries={"max_attempts": 5, "mode": "standard"}))
    except Exception as e:  # noqa: BLE001 - botocore's configuration errors have no common base worth naming
        raise RemoteError(f"S3 client: {_scrub(one_line(e))}") from None


@contextmanager
def _errors(what: str):
    """botocore's many exception types -> one RemoteError line naming the object (credentials scrubbed)."""
    try:
        yield
    except RemoteError:
        raise
    except Exception as e:  # noqa: BLE001 - ClientError, BotoCoreError, connection errors: all end the same way
        if type(e).__module__.split(".")[0] not in ("botocore", "boto3", "urllib3", "s3transfer"):
            raise
        raise RemoteError(f"{what}: {_scrub(one_line(e))}") from None


def _missing(e: Exception) -> bool:
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _get_bytes(s3, bucket: str, key: str) -> bytes | None:
    """An object's bytes, or None when there is no such object."""
    with _errors(f"s3://{bucket}/{key}"):
        try:
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:  # noqa: BLE001 - ClientError is botocore's; it is only told apart by its code
            if _missing(e):
                return None
            raise


def _bar(total_bytes: int, initial_bytes: int, progress: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total_bytes, initial=initial_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, dynamic_ncols=True, disable=not (progress and sys.stderr.isatty()))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- staging: s3:// -> local cache ------------------------------------------------------------------------------
@contextmanager
def _locked(path: Path):
    """One stager per cache folder: other ranks (or runs) wait, then find every shard verified."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_state(folder: Path) -> dict[str, str]:
    state = {}
    try:
        for line in (folder / STATE_NAME).read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and len(parts[1]) == 64:  # a line cut short by a kill is ignored
                state[parts[0]] = parts[1]
    except FileNotFoundError:
        pass
    return state


def _record_state(folder: Path, rel: str, sha256: str) -> None:
    with open(folder / STATE_NAME, "a") as f:
        f.write(f"{rel}\t{sha256}\n")
        f.flush()
        os.fsync(f.fileno())


def _tar_index(path: Path) -> list[dict[str, tuple[int, int]]]:
    """The DALI index a tar implies, read from its headers: [{ext: (data offset, size)}] per sample."""
    samples: list[dict[str, tuple[int, int]]] = []
    last_key = None
    with tarfile.open(path, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if key != last_key:
                samples.append({})
                last_key = key
            samples[-1][ext] = (m.offset_data, m.size)
    return samples


def _download(s3, bucket: str, key: str, part: Path, num_bytes: int, bar) -> str:
    """Fetch ``key`` into ``part``, continuing a part left by a killed run (HTTP range); returns the sha256 of the
    whole file."""
    h = hashlib.sha256()
    have = part.stat().st_size if part.exists() else 0
    if have > num_bytes:
        part.unlink()
        have = 0
    if have:
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                h.update(chunk)
    if have < num_bytes:
        extra = {"Range": f"bytes={have}-"} if have else {}
        with _errors(f"s3://{bucket}/{key}"):
            body = s3.get_object(Bucket=bucket, Key=key, **extra)["Body"]
            with open(part, "ab") as f:
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
    return h.hexdigest()


def _stage_shard(s3, bucket: str, prefix: str, folder: Path, split: str, shard: dict, bar) -> None:
    """One shard and its index, each into a .part file; renamed into place only once the tar matches the
    manifest's sha256 and size and the index matches the tar's own headers."""
    rel = f"{split}/{shard['name']}"
    tar = folder / rel
    idx = tar.with_suffix(INDEX_SUFFIX)
    tar.parent.mkdir(parents=True, exist_ok=True)
    tar_part, idx_part = tar.with_name(tar.name + PART_SUFFIX), idx.with_name(idx.name + PART_SUFFIX)
    key, want, num_bytes = _key(prefix, rel), shard["sha256"], int(shard["num_bytes"])
    resumed = tar_part.exists()
    got = _download(s3, bucket, key, tar_part, num_bytes, bar)
    if got != want and resumed:  # the part may hold bytes of an older object under that name: fetch it whole once
        tar_part.unlink()
        got = _download(s3, bucket, key, tar_part, num_bytes, bar)
    size = tar_part.stat().st_size
    if got != want or size != num_bytes:
        tar_part.unlink()
        raise RemoteError(f"s3://{bucket}/{key}: sha256 {got[:16]}... ({size} bytes) does not match the manifest's "
                          f"{want[:16]}... ({num_bytes} bytes); the object is corrupt or was replaced, nothing of it "
                          f"is used")
    idx_bytes = _get_bytes(s3, bucket, _key(prefix, rel.removesuffix(".tar") + INDEX_SUFFIX))
    if idx_bytes is None:
        raise RemoteError(f"s3://{bucket}/{_key(prefix, rel)}: its DALI index ({INDEX_SUFFIX}) is missing")
    idx_part.write_bytes(idx_bytes)
    try:
        implied = _tar_index(tar_part)
        ok = read_dali_index(idx_part) == implied and len(implied) == int(shard["num_samples"])
    except (ShardFormatError, tarfile.TarError, OSError):
        ok = False
    if not ok:
        idx_part.unlink()
        raise RemoteError(f"s3://{bucket}/{_key(prefix, rel)}: its DALI index does not match the shard's contents "
                          f"(or the manifest's {shard['num_samples']} samples); nothing of it is used")
    os.replace(idx_part, idx)  # index first, as ingest does: a final .tar name always has its final .idx
    os.replace(tar_part, tar)
    _record_state(folder, rel, want)


def stage(uri: str, cache: str | Path | None = None, *, endpoint: str | None = None, progress: bool = True,
          log=_log) -> Path:
    """Make ``uri`` (s3://bucket/prefix holding an ingest output) a local shard folder and return it. Shards
    verified by an earlier call are kept (their sha256 is on record and their size unchanged); the rest are
    downloaded, checked against the manifest, and only then given their final names. The manifest is written
    last, so a cache folder with a manifest is complete."""
    bucket, prefix = parse_location(uri)
    folder = cache_folder(uri, cache)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RemoteError(f"{folder}: cannot create the shard cache ({one_line(e)})") from None
    s3 = client(endpoint)
    with _locked(folder / LOCK_NAME):
        raw = _get_bytes(s3, bucket, _key(prefix, MANIFEST_NAME))
        if raw is None:
            raise RemoteError(f"{uri.rstrip('/')}/{MANIFEST_NAME}: no manifest (not an ingest output, or its upload "
                              f"has not finished)")
        try:
            data = json.loads(raw)
            shards = [(split, s) for split in SPLITS for s in data["splits"].get(split, {}).get("shards", [])]
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise RemoteError(f"{uri.rstrip('/')}/{MANIFEST_NAME}: unreadable manifest ({one_line(e)})") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise RemoteError(f"{uri.rstrip('/')}/{MANIFEST_NAME}: shard format version "
                              f"{data.get('format_version')!r}, this code reads version {FORMAT_VERSION}")
        local_manifest = folder / MANIFEST_NAME
        state = _load_state(folder)

        def verified(split: str, s: dict) -> bool:
            tar = folder / split / s["name"]
            return (state.get(f"{split}/{s['name']}") == s["sha256"] and tar.is_file()
                    and tar.stat().st_size == int(s["num_bytes"]) and tar.with_suffix(INDEX_SUFFIX).is_file())

        todo = [(split, s) for split, s in shards if not verified(split, s)]
        if not todo and local_manifest.is_file() and local_manifest.read_bytes() == raw:
            return folder
        local_manifest.unlink(missing_ok=True)  # until every shard is in place, the folder is not a shard folder
        total = sum(int(s["num_bytes"]) for _, s in shards)
        need = sum(int(s["num_bytes"]) for _, s in todo)
        if todo:
            log(f"staging {uri} -> {folder}: {len(todo)} of {len(shards)} shards ({need / 2**20:,.1f} MiB) to fetch "
                f"and check")
        with _bar(total, total - need, progress, "stage") as bar:
            for split, s in todo:
                _stage_shard(s3, bucket, prefix, folder, split, s, bar)
        for name in SIDE_FILES:
            body = _get_bytes(s3, bucket, _key(prefix, name))
            if body is not None:
                _write_atomic(folder / name, body)
        _write_atomic(local_manifest, raw)
    return folder


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def local_folder(location, cache: str | Path | None = None, *, endpoint: str | None = None,
                 progress: bool = True) -> Path:
    """A shard location as a local folder: a local path as it is, an s3:// location staged (see `stage`)."""
    if is_remote(location):
        return stage(str(location), cache, endpoint=endpoint, progress=progress)
    return Path(location)


# ---- upload: finished ingest folder -> s3:// --------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _remote_sha(s3, bucket: str, key: str) -> tuple[str, int] | None:
    with _errors(f"s3://{bucket}/{key}"):
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - ClientError, told apart by its code
            if _missing(e):
                return None
            raise
    return head.get("Metadata", {}).get("sha256", ""), int(head["ContentLength"])


def check_bucket(uri: str, endpoint: str | None = None) -> None:
    """Fail now, in one line, when the bucket is missing or the credentials cannot reach it (before a long build)."""
    bucket, _ = parse_location(uri)
    s3 = client(endpoint)
    with _errors(f"s3://{bucket}"):
        s3.head_bucket(Bucket=bucket)


def upload(folder: Path, uri: str, *, endpoint: str | None = None, overwrite: bool = False,
           progress: bool = True, log=_log) -> int:
    """Upload a finished ingest folder: every shard, index and side file as one whole object (S3 publishes an
    object only once its upload completed), each tagged with its sha256 so a re-run skips what is already there,
    then manifest.json last: a reader never sees a manifest naming a missing shard. Returns the objects sent."""
    bucket, prefix = parse_location(uri)
    folder = Path(folder)
    raw = (folder / MANIFEST_NAME).read_bytes()
    data = json.loads(raw)
    s3 = client(endpoint)
    manifest_key = _key(prefix, MANIFEST_NAME)
    remote = _get_bytes(s3, bucket, manifest_key)
    if remote == raw:
        log(f"{uri}: already holds this ingest (same manifest.json); nothing to upload")
        return 0
    if remote is not None:
        if not overwrite:
            raise RemoteError(f"{uri}: holds another finished ingest (manifest.json); pass --overwrite to replace it")
        with _errors(f"s3://{bucket}/{manifest_key}"):  # readers must not pair the old manifest with new shards
            s3.delete_object(Bucket=bucket, Key=manifest_key)
    files = []  # (relative path, sha256 or None to compute)
    for split in SPLITS:
        for s in data["splits"].get(split, {}).get("shards", []):
            files += [(f"{split}/{s['name']}", s["sha256"]), (f"{split}/{Path(s['name']).stem}{INDEX_SUFFIX}", None)]
    files += [(name, None) for name in SIDE_FILES if (folder / name).is_file()]
    total = sum((folder / rel).stat().st_size for rel, _ in files)
    sent = 0
    with _bar(total, 0, progress, "upload") as bar:
        for rel, want in files:
            path = folder / rel
            sha = _sha256_file(path)
            if want is not None and sha != want:
                raise RemoteError(f"{path}: sha256 differs from the manifest's; the shard changed after ingest "
                                  f"(run `ingest verify {folder}`)")
            size = path.stat().st_size
            key = _key(prefix, rel)
            if _remote_sha(s3, bucket, key) != (sha, size):
                with _errors(f"s3://{bucket}/{key}"):
                    s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha}})
                sent += 1
            bar.update(size)
    with _errors(f"s3://{bucket}/{manifest_key}"):
        s3.put_object(Bucket=bucket, Key=manifest_key, Body=raw,
                      Metadata={"sha256": hashlib.sha256(raw).hexdigest()})
    log(f"uploaded {folder} -> {uri}: {sent} of {len(files)} objects sent (the rest were there), manifest.json last")
    return sent + 1
