"""`python -m bench <subcommand>`: ingest, data, model, e2e, loss, serve, scale, all, render. Each subcommand lives
in its own module."""
from __future__ import annotations

import importlib
import sys

# subcommand -> module exposing main(argv: list[str]) -> int
SUBCOMMANDS = {
    "ingest": ("bench.ingest_bench", "ingest images/s per worker and scaling with workers"),
    "data": ("bench.data_bench", "DALI pipeline (gpu/cpu) vs torchvision+webdataset DataLoader, images/s"),
    "model": ("bench.model_bench", "ResNet train step: eager/compile x fp32/bf16 x NCHW/channels-last"),
    "e2e": ("bench.e2e_bench", "real shards through DALI into the train step: pipeline efficiency, data-wait %"),
    "dino": ("bench.dino_bench", "DINO step images/s (ViT-S/16, 2x224 + 8x96); `dino loss-memory`: CE peak memory"),
    "loss": ("bench.loss_bench", "fused Triton NT-Xent vs reference PyTorch loss, time and peak memory"),
    "serve": ("bench.serve_bench", "python -m serve under 16 concurrent uploaders: p50 / p95, errors, peak RSS"),
    "scale": ("bench.scale_bench", "cost against size up to 377k images: plan, indexes, reader start-up, kNN"),
    "all": ("bench.all_bench", "every stage on this machine, JSON + Markdown + plot under bench/results/<gpu>/"),
    "render": ("bench.gpu_results", "re-render a GPU check's DIR/summary.md from DIR/results.jsonl"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bench <subcommand> [options]\n\nsubcommands:")
        for name, (_, help_) in SUBCOMMANDS.items():
            print(f"  {name:<7} {help_}")
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"bench: unknown subcommand '{argv[0]}' (choose from {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
