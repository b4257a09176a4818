"""Parsers of `python -m eval <subcommand>`: each protocol's own options on top of eval.arg_types' common ones
(the analysis subcommands' in eval.args_analysis)."""
from __future__ import annotations

import argparse

from eval.arg_types import (MIN_FEWSHOT_SEEDS, VAL_POLICIES, OneLineParser, UsageError, add_common,
                            at_least, floats, fractions, non_negative_float, positive, positive_float,
                            positive_floats)
from eval.args_analysis import add_analysis_arguments
from eval.sampling import DEFAULT_FRACTIONS, DEFAULT_VAL_MIN_PER_CLASS

# "finetune" + dali_pipes' AugmentConfig.PRESETS, spelled out so that parsing arguments (and --help) does not import
# torch / DALI; a test keeps the two lists equal.
AUGMENT_CHOICES = ("finetune", "simclr-cxr", "azizi", "moco-cxr", "simclr", "dino-cxr")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=positive, default=10)
    p.add_argument("--lr", type=positive_float, default=0.01)
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    p.add_argument("--grid", default="none",
                   help="'none', 'azizi' (7 lr x 4 weight decay, the size of Azizi et al.'s sweep; our values, see "
                        "eval.finetune.AZIZI_GRID) or 'LR,LR,...:WD,WD,...'; the best (lr, wd, epoch) on val is kept")
    p.add_argument("--augment", choices=AUGMENT_CHOICES, default="finetune",
                   help="training augmentation, run by the dali_pipes graph on --device: 'finetune' "
                        "(crop >= 60%% area, flip, +-10 deg rotation, light jitter) or a pretraining preset")
    p.add_argument("--crop-scale-min", type=float, default=None,
                   help="override the preset's smallest crop area fraction")
    p.add_argument("--hflip-prob", type=float, default=None, help="override the preset's flip probability")
    p.add_argument("--max-images-in-memory", type=positive, default=20000,
                   help="validation images kept decoded in memory between epochs (larger val splits are re-read); "
                        "training batches are always streamed, reshuffled every epoch")


def build_parser(command: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m eval {command}")
    if command == "linear":
        p.description = ("Logistic-regression probe per task on frozen features (C chosen on val), AUROC/AUPRC with "
                         "patient-bootstrap CIs.")
        add_common(p)
        p.add_argument("--c-grid", type=positive_floats, default=None,
                       help="inverse regularisation grid (default 1e-4..1e2, 7 values)")
    elif command == "fewshot":
        p.description = ("k positives + k negatives per task, a probe per seed (fixed C), scored on the whole test "
                         "split (AUROC and balanced accuracy); mean, sd and 95% interval over >= 20 seeds.")
        add_common(p)
        p.add_argument("--k", type=positive, default=10)
        p.add_argument("--seeds", type=at_least(MIN_FEWSHOT_SEEDS), default=MIN_FEWSHOT_SEEDS,
                       help=f"repetitions, each a fresh k-shot draw (at least {MIN_FEWSHOT_SEEDS}: the spread over "
                            f"draws is as large as the differences between encoders)")
        p.add_argument("--C", type=positive_float, default=1.0, dest="c",
                       help="probe inverse regularisation, fixed (default 1.0, on features standardised with the "
                            "whole unlabelled training split): a k-shot budget has no validation labels to choose it "
                            "on, so C is not tuned (recorded in the result JSON)")
    elif command == "fractions":
        p.description = ("Label-fraction curve: nested patient-level fractions of train, several seeds, linear and/or "
                         "end-to-end.")
        add_common(p)
        p.add_argument("--fractions", type=fractions, default=DEFAULT_FRACTIONS,
                       help="label fractions in (0, 1], sampled by patient and nested (default 0.001,0.01,0.1,1)")
        p.add_argument("--seeds", type=positive, default=3)
        p.add_argument("--mode", choices=("linear", "finetune", "both"), default="linear")
        p.add_argument("--val-policy", choices=VAL_POLICIES, default="matched",
                       help="validation labels for choosing C / the best epoch / the grid cell: 'matched' (default) "
                            "subsamples val by patient to the same fraction as train (nested, per seed), so a 1%% "
                            "curve point is not tuned on 100%% of val; 'full' uses all of val")
        p.add_argument("--val-min-per-class", type=positive, default=DEFAULT_VAL_MIN_PER_CLASS,
                       help=f"matched val: the subset is enlarged (more patients, same order) until every task has at "
                            f"least this many positive and negative val images, where val has them (default "
                            f"{DEFAULT_VAL_MIN_PER_CLASS})")
        p.add_argument("--c-grid", type=positive_floats, default=None)
        _finetune_args(p)
    elif command == "finetune":
        p.description = ("End-to-end fine-tuning (SGD momentum 0.9, augmentation, optional lr x wd grid), best epoch "
                         "on val.")
        add_common(p)
        _finetune_args(p)
    elif command == "compare":
        p.description = ("Paired patient bootstrap of AUROC(a) - AUROC(b) on the same test samples (from stored "
                         "predictions).")
        add_common(p, needs_encoders=False)
        p.add_argument("--a", required=True, help="encoder name (a result in OUT/<protocol>/)")
        p.add_argument("--b", required=True, help="encoder name to compare against")
        p.add_argument("--protocol", choices=("linear", "finetune"), default="linear")
    elif command == "report":
        p.description = "Markdown table, label-fraction curve and ROC curves (PNG), and all numbers as JSON in OUT."
        add_common(p, needs_encoders=False)
    elif command in ("knn", "transfer", "neighbours", "map"):
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
        lrs, wds = positive_floats(lrs), floats(wds)
        if not wds or min(wds) < 0:
            raise ValueError
        return lrs, wds
    except (ValueError, argparse.ArgumentTypeError):
        raise UsageError(f"--grid '{text}': expected none, azizi or 'LR,LR,...:WD,WD,...' (lr > 0, wd >= 0)") from None
