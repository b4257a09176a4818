"""Web page and JSON API over an exported bundle: `python -m serve --bundle DIR` (127.0.0.1 by default)."""
