"""Publishing a file atomically (a unique temp file in the same folder, fsync, rename) and hashing one: the single
implementation every package above ``ingest`` uses, so a reader never meets a torn file under a final name."""
from __future__ import annotations

import hashlib
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

HASH_CHUNK_BYTES = 1 << 20
TEMP_SUFFIX = ".tmp"
# ".<final name>.<16 hex>.tmp": hidden from listings, unique per writer, and mapped back to its final name, so
# a caller that owns a folder can recognise (and remove) the debris a killed writer left.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{16}" + re.escape(TEMP_SUFFIX) + "$")


def temp_target(name: str) -> str | None:
    """The final file name an unfinished ``atomic_write`` temp file was meant for; None for any other name."""
    m = _TEMP_RE.match(name)
    return m.group("name") if m else None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is done, only its durability is the OS's
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, *, text: bool = False, newline: str | None = None,
                 file_mode: int = 0o666) -> Iterator[IO]:
    """``with atomic_write(path) as f: ...`` writes ``f`` (binary, or UTF-8 text with ``text=True``) to a new temp
    file beside ``path``; on a clean exit it is fsynced, renamed over ``path`` and the folder fsynced, on an
    exception it is removed and ``path`` keeps its old content. The parent folder must exist. ``file_mode`` goes
    through the umask like ``open()``'s (0o600 for private files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
    # Every write is fsynced before its rename (and the rename after it): a crash leaves the old file or the new
    # one, never an empty one, whichever file system the output lives on.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), file_mode)
    try:
        with (os.fdopen(fd, "w", encoding="utf-8", newline=newline) if text else os.fdopen(fd, "wb")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, file_mode: int = 0o666) -> Path:
    with atomic_write(path, file_mode=file_mode) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, file_mode: int = 0o666) -> Path:
    with atomic_write(path, text=True, file_mode=file_mode) as f:
        f.write(text)
    return Path(path)


def sha256_file(path: str | Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_bytes`` pieces (constant memory for shard-sized files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
