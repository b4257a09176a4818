"""`ingest` console script: dispatches to build-shards, merge, scan, verify, stats and synth (each in its own
module)."""
from __future__ import annotations

import importlib
import sys

# subcommand -> module exposing main(argv: list[str]) -> int
SUBCOMMANDS = {
    "build-shards": ("ingest.build", "pack a dataset into WebDataset shards with DALI indexes and a manifest"),
    "merge": ("ingest.merge", "after build-shards --part K/N for every K: write the output of one whole run"),
    "scan": ("ingest.scan", "header-only dry run over a DICOM archive: counts, filters, rejects, decoders"),
    "verify": ("ingest.verify", "re-read every shard; check counts, checksums, decoding and patient splits"),
    "stats": ("ingest.stats", "counts per split / label state / view, patients with 2+ images"),
    # the generator lives in the synth package (left of ingest); ingest only names its command
    "synth": ("synth.dataset", "generate procedural chest X-ray phantoms in the CheXpert layout"),
}


def _usage() -> str:
    lines = ["usage: ingest <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `ingest <subcommand> --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ingest: unknown subcommand '{name}' (choose from {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
