"""`ingest` console script: dispatches to build-shards, merge, scan, verify, stats and synth (each in its own
module)."""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from pathlib import Path

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
    if name == "build-shards" and _s3_out(rest):
        return build_shards_s3(rest)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


# ---- build-shards --out s3://bucket/prefix: build in a local staging folder, then upload (ingest.remote) -----------
S3_OPTIONS = ("--staging", "--s3-endpoint")
# Options that change nothing in the output: a rerun differing only in these still continues the same staged build.
NEUTRAL_OPTIONS = ("--workers", "--file-timeout-s")
NEUTRAL_FLAGS = ("--no-progress", "--overwrite")


def _s3_out(argv: list[str]) -> bool:
    """True when --out names an s3:// location, or when the S3-only options are given (to reject them clearly)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out")
    known, _ = parser.parse_known_args(argv)
    return (known.out or "").startswith("s3://") or any(a.split("=")[0] in S3_OPTIONS for a in argv)


def _fingerprint(argv: list[str]) -> str:
    """The build's arguments minus --out and the options that do not change its output."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=")[0]
        if flag in NEUTRAL_FLAGS:
            continue
        if flag in ("--out", *S3_OPTIONS, *NEUTRAL_OPTIONS):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()


def build_shards_s3(argv: list[str]) -> int:
    """Pack into a local staging folder (resumable like any build), then upload the finished output: each object
    whole, manifest.json last. The same command continues an interrupted build or upload."""
    from ingest import remote
    parser = argparse.ArgumentParser(prog="ingest build-shards", add_help=False)
    parser.add_argument("--out", required=True)
    parser.add_argument("--staging", type=Path, default=None)
    parser.add_argument("--s3-endpoint", default=None)
    if any(a in ("-h", "--help") for a in argv):
        return int(importlib.import_module("ingest.build").main(["--help"]) or 0)
    known, rest = parser.parse_known_args(argv)
    prog = "ingest build-shards"
    if not known.out.startswith("s3://"):
        print(f"{prog}: --staging and --s3-endpoint apply to --out s3://bucket/prefix only", file=sys.stderr)
        return 2
    try:
        remote.parse_location(known.out)
        staging = known.staging or remote.cache_folder(known.out, remote.cache_root() / "ingest-staging")
        remote.check_bucket(known.out, known.s3_endpoint)  # boto3, credentials and bucket: before hours of packing
    except remote.RemoteError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    overwrite, progress = "--overwrite" in rest, "--no-progress" not in rest
    # the fingerprint sits beside the staging folder: inside it, ingest would take it for a foreign file
    record = staging.with_name(staging.name + ".build-args")
    fingerprint = _fingerprint(argv)
    finished = (staging / "manifest.json").is_file()
    same = record.is_file() and record.read_text().strip() == fingerprint
    if finished and same and not overwrite:
        print(f"{prog}: {staging} holds the finished build of these arguments; uploading it (--overwrite rebuilds, "
              f"e.g. after the inputs changed)")
    else:
        code = int(importlib.import_module("ingest.build").main([*rest, "--out", str(staging)]) or 0)
        if code != 0 or not (staging / "manifest.json").is_file():
            return code
        record.write_text(fingerprint + "\n")
    try:
        remote.upload(staging, known.out, endpoint=known.s3_endpoint, overwrite=overwrite, progress=progress,
                      log=print)
    except remote.RemoteError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
