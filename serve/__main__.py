"""`python -m serve --bundle DIR [--neighbours SHARDS] [--host 127.0.0.1] [--port 8000] [--token T]`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ingest.errors import one_line

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARS = 16


class ServeError(ValueError):
    """Bad command-line input (one line, exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder written by `python -m eval export`")
    p.add_argument("--neighbours", type=Path, metavar="SHARDS",
                   help="shard folder whose train split is searched for similar images")
    p.add_argument("--neighbours-max", type=int, default=2000, metavar="N",
                   help="index at most N training images (default 2000)")
    p.add_argument("--k", type=int, default=6, help="similar images shown (default 6)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get("SERVE_TOKEN"),
                   help=f"access token (>= {MIN_TOKEN_CHARS} chars; or env SERVE_TOKEN), checked on every request")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--max-upload-mb", type=float, default=32.0)
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="refuse larger images (decompression bombs): N 8-bit pixels, N / 2 16-bit ones")
    p.add_argument("--max-concurrent-decodes", type=int, default=0, metavar="N",
                   help="decode at most N uploads at once (default 0 = the CPUs available)")
    p.add_argument("--max-queued", type=int, default=32, metavar="N",
                   help="uploads waiting for a decode slot before new ones get 503 (default 32)")
    p.add_argument("--max-wait-s", type=float, default=30.0,
                   help="longest wait for a decode slot before 503 + Retry-After (default 30)")
    return p


def check(args) -> None:
    if args.host not in LOCAL_HOSTS and not args.token:
        raise ServeError(f"--host {args.host} is reachable from other machines: give --token (or SERVE_TOKEN)")
    if args.token is not None and len(args.token) < MIN_TOKEN_CHARS:
        raise ServeError(f"--token: use at least {MIN_TOKEN_CHARS} characters "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    if not 0 < args.port < 65536:
        raise ServeError(f"--port {args.port}: not a port number")
    if args.k < 1 or args.neighbours_max < 1 or args.max_upload_mb <= 0 or args.max_pixels < 1:
        raise ServeError("--k, --neighbours-max, --max-upload-mb and --max-pixels must be positive")
    if args.max_concurrent_decodes < 0 or args.max_queued < 0 or args.max_wait_s <= 0:
        raise ServeError("--max-concurrent-decodes and --max-queued must be >= 0 and --max-wait-s > 0")


def build(args):
    """(FastAPI app, predictor) from parsed arguments; the model is loaded here, once."""
    import torch

    from eval.bundle import load_bundle
    from eval.predict import Predictor
    from serve.app import ServeConfig, create_app
    if args.device == "gpu" and not torch.cuda.is_available():
        raise ServeError("--device gpu requested but torch sees no CUDA GPU")
    predictor = Predictor(load_bundle(args.bundle), args.device, args.max_pixels)
    index = None
    if args.neighbours is not None:
        from serve.neighbours import NeighbourIndex
        index = NeighbourIndex.build(predictor, args.neighbours, max_images=args.neighbours_max,
                                     log=lambda m: print(f"serve: {m}", file=sys.stderr))
    config = ServeConfig(token=args.token, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), k=args.k,
                         max_decodes=args.max_concurrent_decodes, max_queued=args.max_queued,
                         max_wait_s=args.max_wait_s)
    return create_app(predictor, config, index), predictor


def main(argv: list[str] | None = None) -> int:
    from eval.bundle import BundleError
    from ingest.schema import ShardFormatError
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        check(args)
        app, _ = build(args)
    except (ServeError, BundleError, ShardFormatError, ValueError) as e:
        print(f"serve: error: {one_line(e)}", file=sys.stderr)
        return 2
    import uvicorn
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serve: http://{host}:{args.port}/{'?token=...' if args.token else ''} (Ctrl-C stops)", file=sys.stderr)
    # Access log off: request lines carry nothing of an upload, but a ?token= query would be logged verbatim.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
