"""Progress bars only where someone watches them: on a terminal, never written into a redirected log file."""
from __future__ import annotations

import sys


def show_progress(requested: bool = True, stream=None) -> bool:
    """True when a bar was asked for and ``stream`` (default: stderr, where tqdm writes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(requested) and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
