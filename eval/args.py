"""Command-line arguments of `python -m eval <subcommand>`: parsers, value checks, one-line argument errors."""
from __future__ import annotations

import argparse
from pathlib import Path

from eval.labels import BLANK_POLICIES, UNCERTAINTY_POLICIES
from eval.sampling import DEFAULT_FRACTIONS, DEFAULT_VAL_MIN_PER_CLASS

# Spelled out (not imported from eval.features) so that parsing arguments does not import torch; a test keeps
# them equal.
EVAL_VIEWS = ("full", "center")
VAL_POLICIES = ("matched", "full")

# "finetune" + dali_pipes' AugmentConfig.PRESETS, spelled out so that parsing arguments (and --help) does not import
# torch / DALI; a test keeps the two lists equal.
AUGMENT_CHOICES = ("finetune", "simclr-cxr", "azizi", "moco-cxr", "simclr")


class UsageError(ValueError):
    """Bad command-line input; reported as one line, exit status 2."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _positive_floats(text: str) -> tuple[float, ...]:
    values = _floats(text)
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got '{text}'")
    return values


def _fractions(text: str) -> tuple[float, ...]:
    values = _floats(text)
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"label fractions must lie in (0, 1], got '{text}'")
    return tuple(sorted(set(values)))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    return value if value > 0 else _bad(f"expected a positive number, got '{text}'")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    return value if value >= 0 else _bad(f"expected a number >= 0, got '{text}'")


def _bad(msg: str):
    raise argparse.ArgumentTypeError(msg)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


MIN_FEWSHOT_SEEDS = 20


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = _positive(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def _common(p: argparse.ArgumentParser, *, needs_encoders: bool = True) -> None:
    p.add_argument("--out", required=True, type=Path, help="eval folder (results, predictions, feature cache, report)")
    p.add_argument("--overwrite", action="store_true", help="replace finished output in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=_positive, default=1000, metavar="B",
                   help="patient bootstrap replicates (default 1000)")
    if not needs_encoders:
        return
    p.add_argument("--shards", required=True, type=Path, help="shard folder written by `ingest build-shards`")
    p.add_argument("--encoder", action="append", default=[], metavar="PATH",
                   help="a run's encoder.pt (or run folder); repeatable")
    p.add_argument("--init", action="append", default=[], choices=("random", "imagenet"),
                   help="baseline encoder: seeded random init (Scratch) or ImageNet weights from the local torch hub "
                        "cache; repeatable")
    p.add_argument("--arch", default=None,
                   help="backbone for --init (default resnet50); checked against --encoder files")
    p.add_argument("--in-channels", type=int, choices=(1, 3), default=None,
                   help="input channels for --init (default: 1 for random, 3 for imagenet); checked against --encoder")
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
    p.add_argument("--image-size", type=_positive, default=224)
    p.add_argument("--resize-size", type=int, default=None,
                   help="--eval-view center: shorter side before the centre crop (default image-size * 8/7)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--num-threads", type=_positive, default=2, help="DALI CPU threads")
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (default OUT/cache)")
    p.add_argument("--probe-backend", choices=("auto", "sklearn", "torch"), default="auto",
                   help="logistic regression solver: scikit-learn, or the same objective by L-BFGS in torch "
                        "(auto: torch on gpu)")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=_positive, default=10)
    p.add_argument("--lr", type=_positive_float, default=0.01)
    p.add_argument("--weight-decay", type=_non_negative_float, default=1e-4)
    p.add_argument("--grid", default="none",
                   help="'none', 'azizi' (7 lr x 4 weight decay, the size of Azizi et al.'s sweep; our values, see "
                        "eval.finetune.AZIZI_GRID) or 'LR,LR,...:WD,WD,...'; the best (lr, wd, epoch) on val is kept")
    p.add_argument("--augment", choices=AUGMENT_CHOICES, default="finetune",
                   help="training augmentation, run by the dali_pipes graph on --device: 'finetune' "
                        "(crop >= 60%% area, flip, +-10 deg rotation, light jitter) or a pretraining preset")
    p.add_argument("--crop-scale-min", type=float, default=None,
                   help="override the preset's smallest crop area fraction")
    p.add_argument("--hflip-prob", type=float, default=None, help="override the preset's flip probability")
    p.add_argument("--max-images-in-memory", type=_positive, default=20000,
                   help="validation images kept decoded in memory between epochs (larger val splits are re-read); "
                        "training batches are always streamed, reshuffled every epoch")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): bad input is reported like every other eval error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m eval {command}")
    if command == "linear":
        p.description = ("Logistic-regression probe per task on frozen features (C chosen on val), AUROC/AUPRC with "
                         "patient-bootstrap CIs.")
        _common(p)
        p.add_argument("--c-grid", type=_positive_floats, default=None,
                       help="inverse regularisation grid (default 1e-4..1e2, 7 values)")
    elif command == "fewshot":
        p.description = ("k positives + k negatives per task, a probe per seed (fixed C), scored on the whole test "
                         "split (AUROC and balanced accuracy); mean, sd and 95% interval over >= 20 seeds.")
        _common(p)
        p.add_argument("--k", type=_positive, default=10)
        p.add_argument("--seeds", type=_at_least(MIN_FEWSHOT_SEEDS), default=MIN_FEWSHOT_SEEDS,
                       help=f"repetitions, each a fresh k-shot draw (at least {MIN_FEWSHOT_SEEDS}: the spread over "
                            f"draws is as large as the differences between encoders)")
        p.add_argument("--C", type=_positive_float, default=1.0, dest="c",
                       help="probe inverse regularisation, fixed (default 1.0, on features standardised with the "
                            "whole unlabelled training split): a k-shot budget has no validation labels to choose it "
                            "on, so C is not tuned (recorded in the result JSON)")
    elif command == "fractions":
        p.description = ("Label-fraction curve: nested patient-level fractions of train, several seeds, linear and/or "
                         "end-to-end.")
        _common(p)
        p.add_argument("--fractions", type=_fractions, default=DEFAULT_FRACTIONS,
                       help="label fractions in (0, 1], sampled by patient and nested (default 0.001,0.01,0.1,1)")
        p.add_argument("--seeds", type=_positive, default=3)
        p.add_argument("--mode", choices=("linear", "finetune", "both"), default="linear")
        p.add_argument("--val-policy", choices=VAL_POLICIES, default="matched",
                       help="validation labels for choosing C / the best epoch / the grid cell: 'matched' (default) "
                            "subsamples val by patient to the same fraction as train (nested, per seed), so a 1%% "
                            "curve point is not tuned on 100%% of val; 'full' uses all of val")
        p.add_argument("--val-min-per-class", type=_positive, default=DEFAULT_VAL_MIN_PER_CLASS,
                       help=f"matched val: the subset is enlarged (more patients, same order) until every task has at "
                            f"least this many positive and negative val images, where val has them (default "
                            f"{DEFAULT_VAL_MIN_PER_CLASS})")
        p.add_argument("--c-grid", type=_positive_floats, default=None)
        _finetune_args(p)
    elif command == "finetune":
        p.description = ("End-to-end fine-tuning (SGD momentum 0.9, augmentation, optional lr x wd grid), best epoch "
                         "on val.")
        _common(p)
        _finetune_args(p)
    elif command == "compare":
        p.description = ("Paired patient bootstrap of AUROC(a) - AUROC(b) on the same test samples (from stored "
                         "predictions).")
        _common(p, needs_encoders=False)
        p.add_argument("--a", required=True, help="encoder name (a result in OUT/<protocol>/)")
        p.add_argument("--b", required=True, help="encoder name to compare against")
        p.add_argument("--protocol", choices=("linear", "finetune"), default="linear")
    elif command == "report":
        p.description = "Markdown table, label-fraction curve and ROC curves (PNG), and all numbers as JSON in OUT."
        _common(p, needs_encoders=False)
    elif command in ("knn", "transfer", "neighbours", "map"):
        from eval.args_analysis import add_analysis_arguments
        add_analysis_arguments(p, command)
    else:
        raise UsageError(f"unknown subcommand '{command}'")
    return p


def parse_grid(text: str):
    """--grid: None, the Azizi-sized grid, or (lrs, wds) from 'LR,LR,...:WD,WD,...'."""
    from eval.finetune import AZIZI_GRID
    if text == "none":
        return None
    if text == "azizi":
        return AZIZI_GRID
    try:
        lrs, wds = text.split(":")
        lrs, wds = _positive_floats(lrs), _floats(wds)
        if not wds or min(wds) < 0:
            raise ValueError
        return lrs, wds
    except (ValueError, argparse.ArgumentTypeError):
        raise UsageError(f"--grid '{text}': expected none, azizi or 'LR,LR,...:WD,WD,...' (lr > 0, wd >= 0)") from None
