"""One line of text from an exception, for every command's `error:` line: the message's first non-empty line, or the
exception type's name where the message is empty (`EOFError()` from a zero-byte file, `KeyError()`)."""
from __future__ import annotations


def one_line(exc: BaseException, *, limit_chars: int | None = None, with_type: bool = False) -> str:
    """First non-empty line of ``str(exc)`` (cut to ``limit_chars``), else ``type(exc).__name__``; never raises.
    ``with_type`` prefixes the type's name ("EOFError: ..."), without repeating it when the message is empty."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not replace the error being reported
        text = ""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if limit_chars is not None and len(line) > limit_chars:
        line = line[: max(0, limit_chars - 3)].rstrip() + "..."
    if not line:
        return name
    return f"{name}: {line}" if with_type else line
