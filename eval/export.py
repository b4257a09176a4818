"""`python -m eval export`: one evaluated encoder + its linear probes or fine-tuned network -> a bundle folder
(weights, tasks, eval view, AUROC with CIs, a validation-chosen threshold per task, provenance, model card).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eval.bundle import BUNDLE_FORMAT, VIEWS, BundleError
from ingest.errors import one_line
from ingest.files import sha256_file

THRESHOLD_RULES = ("youden", "sensitivity")
VAL_REPLICATES = 1000


class ExportError(ValueError):
    """Bad input to `eval export` (one line)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval export", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="eval folder written by `python -m eval linear|finetune`")
    p.add_argument("--encoder", required=True, metavar="NAME",
                   help="encoder name as in OUT/<protocol>/NAME.json, or the run folder (runs/NAME) or encoder.pt "
                        "it was named after")
    p.add_argument("--protocol", required=True, choices=("linear", "finetune"))
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--sensitivity", type=float, default=None, metavar="S",
                   help="threshold per task = the highest one reaching validation sensitivity >= S "
                        "(default: Youden's J)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="for the fine-tuned network's validation pass")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    return p


def choose_threshold(targets: np.ndarray, scores: np.ndarray, sensitivity: float | None = None) -> dict:
    """Operating point on validation labels (NaN targets masked). Youden's J: the threshold maximising
    sensitivity + specificity - 1 (ties: the higher threshold). With ``sensitivity``: the highest threshold whose
    validation sensitivity reaches it. One-class validation labels: 0.5, with a note."""
    from sklearn.metrics import roc_curve
    keep = ~np.isnan(targets) & ~np.isnan(scores)
    y, s = targets[keep] > 0.5, scores[keep]
    rule = "youden" if sensitivity is None else f"sensitivity>={sensitivity:g}"
    if y.all() or not y.any():
        return {"threshold": 0.5, "rule": rule, "note": "validation labels hold one class; threshold 0.5 (uninformed)"}
    fpr, tpr, thr = roc_curve(y, s)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # roc_curve's first point is threshold +inf (nothing positive)
    if sensitivity is None:
        i = int(np.argmax(tpr - fpr))  # first maximum = highest threshold
    else:
        i = int(np.flatnonzero(tpr >= sensitivity)[0])
    return {"threshold": float(thr[i]), "rule": rule, "val_sensitivity": float(tpr[i]),
            "val_specificity": float(1 - fpr[i]), "note": ""}


def val_auroc_ci(targets: np.ndarray, scores: np.ndarray, pids: np.ndarray | None, tasks: list[str]) -> dict:
    """{task: (val AUROC, [lo, hi] 95% bootstrap CI or [None, None])} on the validation split: patients resampled
    where their ids were stored, images otherwise."""
    from eval.bootstrap import bootstrap_ci
    from eval.metrics import auroc
    pids = np.arange(len(targets)) if pids is None else np.asarray(pids)
    ci = bootstrap_ci(targets, scores, pids, tasks, num_replicates=VAL_REPLICATES, seed=0)["tasks"]
    out = {}
    for j, t in enumerate(tasks):
        point = auroc(targets[:, j], scores[:, j])
        out[t] = (point if np.isfinite(point) else None, ci.get(t, {}).get("auroc_ci", [None, None]))
    return out


def is_validated(ci: list) -> bool:
    """A probe counts as validated when its whole validation AUROC CI lies above chance (0.5)."""
    return ci is not None and ci[0] is not None and ci[0] > 0.5


def _at(targets: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict:
    if threshold is None:
        return {"test_sensitivity": None, "test_specificity": None}
    keep = ~np.isnan(targets) & ~np.isnan(scores)
    y, flag = targets[keep] > 0.5, scores[keep] >= threshold
    sens = float((flag & y).sum() / y.sum()) if y.any() else None
    spec = float((~flag & ~y).sum() / (~y).sum()) if (~y).any() else None
    return {"test_sensitivity": sens, "test_specificity": spec}


def _policy(result: dict) -> dict:
    from eval.labels import LabelPolicy, as_policy
    raw = result.get("label_policy")
    policy = LabelPolicy(**raw) if isinstance(raw, dict) else as_policy(raw or result.get("uncertainty", "u-ignore"))
    return policy.to_json()


def _encoder(result: dict) -> tuple[dict, str]:
    """(backbone state without the ImageNet adapter, adapter name) from the result's encoder record; the weights
    must still hash to what was evaluated."""
    from eval.features import EncoderError, encoder_hash, encoder_spec, read_spec
    e = result["encoder"]
    try:
        if e["kind"] == "checkpoint":
            spec = encoder_spec(e["path"], arch=e["arch"], in_channels=e["in_channels"])
        else:
            spec = encoder_spec(init=e["kind"], arch=e["arch"], in_channels=e["in_channels"], seed=e.get("seed") or 0)
        if encoder_hash(spec) != e["sha256"]:
            raise ExportError(f"{spec.path or spec.name}: encoder weights changed since they were evaluated "
                              "(sha256 differs)")
        backbone = read_spec(spec).model  # torchvision names; the ImageNet adapter is the bundle's input_adapter
    except EncoderError as err:
        raise ExportError(str(err)) from None
    return backbone.state_dict(), "imagenet" if spec.kind == "imagenet" else "none"


def _view(result: dict) -> dict:
    t = result.get("transform", {})
    mode = t.get("eval_view") or result.get("eval_view") or "center"  # runs that predate --eval-view centre-crop
    if mode not in VIEWS:
        raise ExportError(f"eval view '{mode}' is not one this code reproduces ({', '.join(VIEWS)})")
    view = {"mode": mode, "image_size": int(t["image_size"])}
    if mode == "center":  # the full view squashes the whole film: no intermediate resize
        view["resize_size"] = int(t["resize_size"])
    return view


def _linear_parts(folder: Path, name: str, tasks: list[str]):
    path = folder / f"{name}.heads.pt"
    if not path.is_file():
        raise ExportError(f"{path}: no stored probe weights; re-run `python -m eval linear` (it now writes them)")
    heads = _load(path, ("tasks", "weight", "bias", "feature_mean", "feature_std"))
    if list(heads["tasks"]) != tasks:
        raise ExportError(f"{path}: tasks {heads['tasks']} differ from the result's {tasks}")
    if "val_scores" not in heads:
        raise ExportError(f"{path}: no validation scores stored; thresholds need them")
    pids = heads.get("val_pids")  # absent in heads written before they were stored: images are resampled
    return heads, heads["val_scores"].numpy(), heads["val_targets"].numpy(), None if pids is None else np.asarray(pids)


def _load(path: Path, keys: tuple[str, ...]) -> dict:
    """A torch file written by `eval linear|finetune` (weights only), with ``keys``; ExportError otherwise."""
    import torch
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated, empty or foreign file is the same user error
        raise ExportError(f"{path}: unreadable ({one_line(e, limit_chars=120, with_type=True)})") from None
    missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise ExportError(f"{path}: missing {', '.join(missing)}")
    return doc


def _finetune_parts(folder: Path, name: str, result: dict, tasks: list[str], device: str):
    import torch

    from eval.bundle import ProbeHeads, build_model
    from eval.features import EncoderSpec, Transform, extract_features
    from eval.labels import LabelPolicy, select_targets
    path = folder / f"{name}.pt"
    if not path.is_file():
        raise ExportError(f"{path}: no fine-tuned weights; run `python -m eval finetune` first")
    doc = _load(path, ("head", "arch", "in_channels", "backbone"))
    dim = doc["head"]["weight"].shape[1]
    heads = {"weight": doc["head"]["weight"].double(), "bias": doc["head"]["bias"].double(),
             "feature_mean": torch.zeros(dim, dtype=torch.float64), "feature_std": torch.ones(dim, dtype=torch.float64)}
    adapter = "imagenet" if result["encoder"]["kind"] == "imagenet" else "none"
    vit_features = _vit_features(result)
    model = build_model(doc["arch"], int(doc["in_channels"]), doc["backbone"],
                        ProbeHeads(heads["weight"], heads["bias"], heads["feature_mean"], heads["feature_std"]),
                        adapter, source=path, vit_features=vit_features)
    # The validation scores were not stored by finetune: score the val split once through the eval loader.
    spec = EncoderSpec("checkpoint", doc["arch"], int(doc["in_channels"]), name, path=path, vit_features=vit_features)
    trunk = _Features(model)
    v = _view(result)
    transform = Transform(v["image_size"], v.get("resize_size", 256), view=v["mode"])
    fs = extract_features(spec, Path(result["shards"]), "val", device=device, model=trunk, cache_dir=None,
                          transform=transform, log=lambda m: None)
    with torch.no_grad():
        scores = torch.sigmoid(model.heads(torch.from_numpy(fs.features))).double().numpy()
    targets = select_targets(fs.labels, fs.label_names, tasks, LabelPolicy(**_policy(result)))
    return heads, doc["backbone"], adapter, scores, targets, np.asarray(fs.pids)


class _Features(torch.nn.Module):
    """A bundle model as extract_features' ``model``: images -> the features its heads read."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def _vit_features(result: dict) -> str | None:
    """The evaluated ViT's feature choice (results written before the option held the CLS token); None for a
    ResNet."""
    from trainer.vit import is_vit
    e = result["encoder"]
    return (e.get("vit_features") or "cls") if is_vit(e["arch"]) else None


def export(args) -> Path:
    from eval.bundle import write_bundle
    from eval.card import model_card
    folder = args.out / args.protocol
    name = result_name(folder, args.encoder)
    rpath = folder / f"{name}.json"
    if not rpath.is_file():
        raise ExportError(f"{rpath}: no result; run `python -m eval {args.protocol} --out {args.out}` "
                          f"for '{args.encoder}' first")
    if args.bundle.exists() and not args.overwrite:
        raise ExportError(f"{args.bundle}: exists; pass --overwrite to replace it")
    if args.sensitivity is not None and not 0 < args.sensitivity <= 1:
        raise ExportError(f"--sensitivity {args.sensitivity}: must lie in (0, 1]")
    try:
        result = json.loads(rpath.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{rpath}: unreadable result ({one_line(err)})") from None
    tasks = list(result["task_names"])
    e = result["encoder"]
    vit_features = _vit_features(result)  # absent from a ResNet bundle, as in every bundle before ViTs
    if args.protocol == "linear":
        backbone, adapter = _encoder(result)
        heads, val_scores, val_targets, val_pids = _linear_parts(folder, name, tasks)
    else:
        heads, backbone, adapter, val_scores, val_targets, val_pids = _finetune_parts(
            folder, name, result, tasks, args.device)
    trained = [j for j, t in enumerate(tasks) if bool(np.isfinite(heads["weight"][j].numpy()).all())]
    if not trained:
        raise ExportError(f"{rpath}: no task has a trained head")
    keep = [tasks[j] for j in trained]
    with np.load(folder / f"{name}.npz") as z:
        test_targets, test_scores = z["targets"], z["scores"]
    val = val_auroc_ci(val_targets[:, trained], val_scores[:, trained], val_pids, keep)
    thresholds, metrics = {}, {}
    for j in trained:
        t = tasks[j]
        point, ci = val[t]
        if is_validated(ci):
            thr = {**choose_threshold(val_targets[:, j], val_scores[:, j], args.sensitivity), "validated": True}
        else:  # a chance-level ROC curve has no meaningful operating point: no threshold, no flag
            thr = {"threshold": None, "rule": _rule_name(args.sensitivity), "validated": False,
                   "note": f"not validated: {_chance_text(point, ci)}; no threshold, findings marked not validated"}
            warn(f"{t}: {thr['note']}")
        thresholds[t] = {**thr, **_at(test_targets[:, j], test_scores[:, j], thr["threshold"])}
        row = result["tasks"].get(t, {})
        metrics[t] = {"test_auroc": row.get("auroc"), "test_auroc_ci": row.get("auroc_ci"),
                      "test_auprc": row.get("auprc"), "val_auroc": (result.get("val_auroc") or {}).get(t),
                      "val_auroc_ci": ci, "test_positives": row.get("n_pos"), "test_negatives": row.get("n_neg")}
    shards = Path(result["shards"])
    manifest = shards / "manifest.json"
    ingest_opts = json.loads(manifest.read_text()).get("options", {}) if manifest.is_file() else {}
    meta = {"format": BUNDLE_FORMAT, "tasks": keep, "protocol": args.protocol,
            "encoder": {"name": e["name"], "category": e["category"], "kind": e["kind"], "arch": e["arch"],
                        "in_channels": int(e["in_channels"]), "input_adapter": adapter, "sha256": e["sha256"],
                        **({} if vit_features is None else {"vit_features": vit_features})},
            "view": _view(result), "normalisation": _normalisation(),
            "ingest": {"size": int(ingest_opts.get("size", 256)), "quality": int(ingest_opts.get("quality", 95))},
            "metrics": metrics, "mean_test_auroc": result.get("mean_auroc"),
            "mean_test_auroc_ci": result.get("mean_auroc_ci"),
            "thresholds": thresholds, "threshold_rule": _rule_text(args.sensitivity), "calibration": None,
            "provenance": {"encoder_sha256": e["sha256"],
                           "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
                           "label_policy": _policy(result), "protocol": args.protocol,
                           "eval_result": str(rpath.resolve()),
                           "evaluated": result.get("time"),
                           "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "num_images": result.get("num_images")}}
    model_doc = {"backbone": backbone, "head_weight": heads["weight"][trained].float(),
                 "head_bias": heads["bias"][trained].float(), "feature_mean": heads["feature_mean"].float(),
                 "feature_std": heads["feature_std"].float()}
    write_bundle(args.bundle, model_doc, meta, model_card(meta))
    return args.bundle


def result_name(folder: Path, encoder: str) -> str:
    """The result name for ``--encoder``: a name as given when OUT/<protocol>/NAME.json exists; else a run folder or
    encoder file is turned into the name `eval` gave it (the run folder's name), or matched by its path."""
    path = Path(encoder)
    if (folder / f"{encoder}.json").is_file() or not (len(path.parts) > 1 or path.exists()):
        return encoder  # a plain name: export reports a missing result under that name
    file = path if path.suffix == ".pt" and not path.is_dir() else path / "encoder.pt"
    guess = file.parent.name if file.name == "encoder.pt" else file.stem
    if (folder / f"{guess}.json").is_file():
        return guess
    for rpath in sorted(folder.glob("*.json")):  # evaluated under another --name: match the encoder's path
        try:
            recorded = json.loads(rpath.read_text()).get("encoder", {}).get("path")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded and Path(recorded).resolve() == file.resolve():
            return rpath.stem
    return guess


def warn(message: str) -> None:
    print(f"eval export: warning: {message}", file=sys.stderr, flush=True)


def _chance_text(point: float | None, ci: list) -> str:
    if ci[0] is None or ci[1] is None:
        return f"validation AUROC {_f(point)} has no CI (the validation labels hold one class)"
    where = "lies below 0.5 (worse than chance)" if ci[1] < 0.5 else "includes 0.5 (chance level)"
    return f"validation AUROC {_f(point)}, 95% CI [{_f(ci[0])}, {_f(ci[1])}] {where}"


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _rule_name(sensitivity: float | None) -> str:
    return "youden" if sensitivity is None else f"sensitivity>={sensitivity:g}"


def _normalisation() -> dict:
    import dali_pipes
    return {"input": "8-bit gray / 255", "mean": float(dali_pipes.CXR_MEAN), "std": float(dali_pipes.CXR_STD)}


def _rule_text(sensitivity: float | None) -> str:
    unvalidated = "; none for a task whose validation AUROC 95% CI does not lie above 0.5 (not validated)"
    if sensitivity is None:
        return ("Youden's J on the validation split: the threshold maximising sensitivity + specificity - 1"
                + unvalidated)
    return f"the highest threshold whose validation sensitivity is >= {sensitivity:g}" + unvalidated


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)
    try:
        path = export(args)
    except (ExportError, BundleError, FileNotFoundError, KeyError) as e:
        msg = one_line(e)
        print(f"eval export: error: {'missing field ' + msg if isinstance(e, KeyError) else msg}", file=sys.stderr)
        return 2
    print(f"eval export: bundle -> {path}", file=sys.stderr)
    return 0
