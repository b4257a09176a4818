"""The pseudonym key and the private log: both live outside OUT (per-user defaults, mode 600), so whoever
receives a shard folder receives neither the salt nor the raw source paths."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ingest.files import atomic_write

SALT_BYTES = 32


class PrivacyError(ValueError):
    """A salt file or private log location that would leak (inside OUT / --root, readable by others)."""


def pseudonymise(value: str, salt: bytes, prefix: str = "") -> str:
    """Salted HMAC-SHA256 of an identifier, 64 bits hex: stable for one salt, unlinkable without it."""
    return prefix + hmac.new(salt, value.strip().encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def _user_dir(env: str, fallback: str) -> Path:
    base = os.environ.get(env) or str(Path.home() / fallback)
    return Path(base) / "cxr-ssl"


def default_salt_file() -> Path:
    """$XDG_CONFIG_HOME/cxr-ssl/pseudonym-salt (else ~/.config/...): one key per user, reused across runs."""
    return _user_dir("XDG_CONFIG_HOME", ".config") / "pseudonym-salt"


def default_private_log(out: Path) -> Path:
    """$XDG_STATE_HOME/cxr-ssl/ingest/<hash of OUT's absolute path>.tsv: stable per OUT, so a resume rewrites it."""
    tag = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]
    return _user_dir("XDG_STATE_HOME", ".local/state") / "ingest" / f"{tag}.tsv"


def check_outside(path: Path, folders: dict[str, Path], what: str) -> None:
    p = Path(path).resolve()
    for option, folder in folders.items():
        if p.is_relative_to(Path(folder).resolve()):
            raise PrivacyError(f"{path}: the {what} must not be inside {option} ({folder})")


def _private_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)


def load_or_create_salt(path: Path) -> tuple[bytes, bool]:
    """(salt, created). A new salt is 32 random bytes (hex) in a file created 0600; an existing one is reused
    only while no one but its owner can read it."""
    path = Path(path)
    if not path.exists():
        _private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(SALT_BYTES) + "\n")
        created = True
    else:
        created = False
    if not path.is_file():
        raise PrivacyError(f"{path}: --salt-file is not a file")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PrivacyError(f"{path}: --salt-file is readable by others (mode {mode:o}); chmod 600 it")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PrivacyError(f"{path}: cannot read --salt-file ({e.strerror})") from None
    try:
        salt = raw.decode("utf-8").strip().encode()
    except UnicodeDecodeError as e:
        raise PrivacyError(f"{path}: --salt-file is not text (byte {e.start} is not UTF-8); it holds one line, "
                           "e.g. the 64 hex characters ingest writes when the file does not exist") from None
    if len(salt) < 16:
        raise PrivacyError(f"{path}: --salt-file holds {len(salt)} characters; at least 16 needed")
    return salt, created


def write_private_log(path: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    """Rows of (input_id, sha256, status, reason, source_path) to a 0600 TSV: the map back to raw paths."""
    path = Path(path)
    _private_dir(path.parent)
    with atomic_write(path, text=True, file_mode=0o600) as f:
        f.write("input_id\tsha256\tstatus\treason\tsource_path\n")
        for row in rows:
            f.write("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in row) + "\n")
