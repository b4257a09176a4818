"""`python -m eval <subcommand>`: the one dispatch table of eval's subcommands."""
from __future__ import annotations

import importlib
import sys

# name: (module, runner, help). A runner takes the parsed arguments (eval.args builds every parser); "main" means the
# module parses its own argv (export, predict, export-weights).
SUBCOMMANDS = {
    "linear": ("eval.cli", "run_linear", "logistic-regression probe per task on frozen features"),
    "fewshot": ("eval.cli", "run_fewshot", "k positives + k negatives per task, repeated over seeds"),
    "fractions": ("eval.cli", "run_fractions", "label-fraction curve (patient-sampled, nested), linear and end-to-end"),
    "finetune": ("eval.cli", "run_finetune", "end-to-end fine-tuning with an optional lr x weight-decay grid"),
    "compare": ("eval.cli", "run_compare", "paired patient bootstrap of the AUROC difference between two encoders"),
    "knn": ("eval.cli_analysis", "run_knn",
            "weighted kNN on cosine similarity, per-task AUROC with patient-bootstrap CIs"),
    "transfer": ("eval.cli_analysis", "run_transfer",
                 "probes fitted on one dataset, scored without refitting on another (distribution shift)"),
    "neighbours": ("eval.cli_analysis", "run_neighbours",
                   "PNG grid of test images with their nearest training images"),
    "map": ("eval.cli_analysis", "run_map",
            "2-D map (PCA / t-SNE) of features coloured by a label, view, sex or dataset"),
    "report": ("eval.cli", "run_report", "Markdown table, label-fraction curve, ROC curves and JSON in one folder"),
    "export": ("eval.export", "main",
               "one evaluated encoder + heads -> a bundle folder (weights, thresholds, model card)"),
    "predict": ("eval.predict", "main", "a bundle's probabilities and flags for JPEG / PNG / DICOM files -> CSV"),
    "export-weights": ("eval.weights", "main",
                       "an encoder -> model.safetensors + config.json that timm / torchvision load without cxr-ssl"),
}


def _run_parsed(command: str, runner, argv: list[str]) -> int:
    from eval.arg_types import UsageError
    from eval.args import build_parser
    from eval.devices import DeviceError
    from eval.features import EncoderError
    from eval.labels import TaskError
    from ingest.errors import one_line
    from ingest.schema import ShardFormatError
    try:
        args = build_parser(command).parse_args(argv[1:])
    except SystemExit as e:  # --help (0) or a one-line argument error (2), already printed
        return int(e.code or 0)
    args.argv = list(argv)  # recorded in every result JSON
    try:
        runner(args)
    except (UsageError, TaskError, EncoderError, DeviceError, ShardFormatError, FileNotFoundError, FileExistsError,
            ImportError) as e:
        print(f"eval {command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m eval <subcommand> [options]\n\nsubcommands:")
        for name, (_, _, help_) in SUBCOMMANDS.items():
            print(f"  {name:<{max(map(len, SUBCOMMANDS))}} {help_}")
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"eval: unknown subcommand '{argv[0]}' (choose from {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    module_name, runner, _ = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    if runner == "main":
        return int(module.main(argv) or 0)
    return _run_parsed(argv[0], getattr(module, runner), argv)


if __name__ == "__main__":
    sys.exit(main())
