"""Argument types and the options every `python -m eval` protocol shares: value checks with one-line errors, the
one-line-error parser, and the common encoder / shards / label-policy options."""
from __future__ import annotations

import argparse
from pathlib import Path

from eval.labels import BLANK_POLICIES, UNCERTAINTY_POLICIES
from ingest.remote import location_arg

# Spelled out (not imported from eval.features) so that parsing arguments does not import torch; a test keeps
# them equal.
EVAL_VIEWS = ("full", "center")
VIT_FEATURES = ("cls", "mean", "both")  # trainer.vit.VIT_FEATURES
VAL_POLICIES = ("matched", "full")

class UsageError(ValueError):
    """Bad command-line input; reported as one line, exit status 2."""


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def positive_floats(text: str) -> tuple[float, ...]:
    values = floats(text)
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got '{text}'")
    return values


def fractions(text: str) -> tuple[float, ...]:
    values = floats(text)
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"label fractions must lie in (0, 1], got '{text}'")
    return tuple(sorted(set(values)))


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    return value if value > 0 else bad(f"expected a positive number, got '{text}'")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    return value if value >= 0 else bad(f"expected a number >= 0, got '{text}'")


def bad(msg: str):
    raise argparse.ArgumentTypeError(msg)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


MIN_FEWSHOT_SEEDS = 20


def at_least(minimum: int):
    def parse(text: str) -> int:
        value = positive(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def add_common(p: argparse.ArgumentParser, *, needs_encoders: bool = True) -> None:
    p.add_argument("--out", required=True, type=Path, help="eval folder (results, predictions, feature cache, report)")
    p.add_argument("--overwrite", action="store_true", help="replace finished output in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=positive, default=1000, metavar="B",
                   help="patient bootstrap replicates (default 1000)")
    if not needs_encoders:
        return
    p.add_argument("--shards", required=True, type=location_arg,
                   help="shard folder written by `ingest build-shards`, or s3://bucket/prefix (staged into "
                        "--shards-cache)")
    p.add_argument("--shards-cache", type=Path, default=None,
                   help="where s3:// shards are staged, as CACHE/<bucket>/<prefix> (default ~/.cache/cxr-ssl/shards)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL for s3:// shards (default: AWS_ENDPOINT_URL, else AWS); "
                        "credentials come from the environment only")
    p.add_argument("--encoder", action="append", default=[], metavar="PATH",
                   help="a run's encoder.pt (or run folder); repeatable")
    p.add_argument("--init", action="append", default=[], choices=("random", "imagenet"),
                   help="baseline encoder: seeded random init (Scratch) or ImageNet weights from the local torch hub "
                        "cache; repeatable")
    p.add_argument("--arch", default=None,
                   help="backbone for --init (default resnet50); checked against --encoder files")
    p.add_argument("--in-channels", type=int, choices=(1, 3), default=None,
                   help="input channels for --init (default: 1 for random, 3 for imagenet); checked against --encoder")
    p.add_argument("--vit-features", choices=VIT_FEATURES, default="cls",
                   help="what a vit_* encoder hands to the probes: its CLS token (default), the mean of its patch "
                        "tokens, or both concatenated [CLS, mean] (twice the width); part of the feature cache key "
                        "and recorded in each result; a run without a ViT encoder takes only the default")
    p.add_argument("--tasks", default="all",
                   help="'all' (every label of the shards), 'chexpert5', or comma-separated label names")
    p.add_argument("--blank", choices=BLANK_POLICIES, default="zero",
                   help="policy for blank (not mentioned) labels: 'zero' = negative (default; CheXpert's convention, "
                        "as in the CheXpert baselines and the CXR SSL studies) or 'mask' (left out of training and "
                        "scoring)")
    p.add_argument("--uncertainty", choices=UNCERTAINTY_POLICIES, default="u-ignore",
                   help="policy for -1 labels (default u-ignore)")
    p.add_argument("--eval-view", choices=EVAL_VIEWS, default="full",
                   help="deterministic input view: 'full' (default) squashes the whole film to image-size x image-size "
                        "(aspect not kept: no anatomy is cut, and training's random resized crops are also resized "
                        "to a square from aspect ratios 3/4..4/3, so the mild squash stays in distribution; "
                        "letterbox bars would waste pixels and never occur in training); 'center' resizes the "
                        "shorter side to --resize-size and centre-crops image-size (cuts the costophrenic angles "
                        "and apices of a portrait film)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="DALI pipeline + model device (default: gpu if CUDA is available)")
    p.add_argument("--image-size", type=positive, default=224)
    p.add_argument("--resize-size", type=int, default=None,
                   help="--eval-view center: shorter side before the centre crop (default image-size * 8/7)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--num-threads", type=positive, default=2, help="DALI CPU threads")
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (default OUT/cache)")
    p.add_argument("--probe-backend", choices=("auto", "sklearn", "torch"), default="auto",
                   help="logistic regression solver: scikit-learn, or the same objective by L-BFGS in torch "
                        "(auto: torch on gpu)")


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): bad input is reported like every other eval error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


