"""Arguments of `python -m eval {knn,transfer,neighbours,map}` (built on eval.arg_types' common options)."""
from __future__ import annotations

import argparse

from eval.arg_types import add_common, positive, positive_float, positive_floats
from ingest.remote import location_arg

ANALYSIS_COMMANDS = ("knn", "transfer", "neighbours", "map")


def add_analysis_arguments(p: argparse.ArgumentParser, command: str) -> None:
    if command == "knn":
        p.description = ("Weighted kNN on cosine similarity (training split = bank, votes exp(sim / T)), per-task test "
                         "AUROC with patient-bootstrap CIs; nothing is tuned.")
        add_common(p)
        p.add_argument("--k", type=positive, default=20, help="neighbours per test image (default 20)")
        p.add_argument("--temperature", type=positive_float, default=0.07,
                       help="vote weight exp(sim / T) (default 0.07)")
        p.add_argument("--chunk-elements", type=positive, default=1 << 24,
                       help="similarities held at once (query x bank block; default 2^24 = 64 MiB of float32)")
    elif command == "transfer":
        p.description = ("Distribution shift: linear probes fitted (C on val) on --shards, scored without refitting "
                         "on its test split and on --target-shards (their test split, or all of them when they have "
                         "no split).")
        add_common(p)
        p.add_argument("--target-shards", required=True, type=location_arg,
                       help="shard folder (or s3://bucket/prefix) of the shifted dataset")
        p.add_argument("--task-map", action="append", default=[], metavar="SRC=DST",
                       help="source label = target label, beyond the built-in CheXpert / MIMIC / NIH names; repeatable")
        p.add_argument("--c-grid", type=positive_floats, default=None,
                       help="inverse regularisation grid (default 1e-4..1e2)")
        p.add_argument("--finetuned", action="store_true",
                       help="also score each encoder's fine-tuned checkpoint OUT/finetune/<encoder>.pt (from "
                            "`python -m eval finetune` on the same source shards) on both sets, unchanged")
    elif command == "neighbours":
        p.description = "PNG grid: Q test images, each with its k most cosine-similar training images, captioned."
        add_common(p)
        p.add_argument("--queries", type=positive, default=8, help="test images shown (seeded choice; default 8)")
        p.add_argument("--k", type=positive, default=5, help="neighbours per test image (default 5)")
    elif command == "map":
        p.description = ("2-D map (PCA or t-SNE) of one split's features coloured by a label, view, sex or dataset: "
                         "PNG + CSV.")
        add_common(p)
        p.add_argument("--split", choices=("train", "val", "test"), default="test")
        p.add_argument("--add-shards", action="append", type=location_arg, default=[], metavar="DIR",
                       help="another dataset's shards on the same map (its --split, or all of it without splits); "
                            "repeatable; with --color-by dataset it shows the domain gap")
        p.add_argument("--method", choices=("pca", "tsne"), default="pca")
        p.add_argument("--color-by", default="view",
                       help="a label name (positive / negative / masked), view, sex or dataset")
        p.add_argument("--max-points", type=positive, default=5000,
                       help="seeded subsample of larger splits (t-SNE is O(N^2))")
