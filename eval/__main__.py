"""`python -m eval <subcommand>`: dispatches to the protocol modules."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "linear": ("eval.cli", "logistic-regression probe per task on frozen features"),
    "fewshot": ("eval.cli", "k positives + k negatives per task, repeated over seeds"),
    "fractions": ("eval.cli", "label-fraction curve (patient-sampled, nested), linear and end-to-end"),
    "finetune": ("eval.cli", "end-to-end fine-tuning with an optional lr x weight-decay grid"),
    "compare": ("eval.cli", "paired patient bootstrap of the AUROC difference between two encoders"),
    "knn": ("eval.cli", "weighted kNN on cosine similarity, per-task AUROC with patient-bootstrap CIs"),
    "transfer": ("eval.cli", "probes fitted on one dataset, scored without refitting on another (distribution shift)"),
    "neighbours": ("eval.cli", "PNG grid of test images with their nearest training images"),
    "map": ("eval.cli", "2-D map (PCA / t-SNE) of features coloured by a label, view, sex or dataset"),
    "report": ("eval.cli", "Markdown table, label-fraction curve, ROC curves and JSON in one folder"),
    "export": ("eval.export", "one evaluated encoder + heads -> a bundle folder (weights, thresholds, model card)"),
    "predict": ("eval.predict", "a bundle's probabilities and flags for JPEG / PNG / DICOM files -> CSV"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m eval <subcommand> [options]\n\nsubcommands:")
        for name, (_, help_) in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_}")
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"eval: unknown subcommand '{argv[0]}' (choose from {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
