"""Orchestration for `python -m eval {linear,fewshot,fractions,finetune,compare,report}`.

Results land in one eval folder: OUT/<protocol>/<encoder>.json (+ .npz test predictions), OUT/compare/,
and `report` writes OUT/report.md, OUT/report.json and the PNG figures.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eval.arg_types import UsageError
from eval.args import parse_grid
from eval.cli_common import (features_of, fmt, fmt_ci, guard_outputs, log, policy_of, prepare, probe_options,
                             run_context, save_predictions, transform_of, write_json)
from eval.features import EncoderSpec
from ingest.files import atomic_write
from ingest.schema import load_manifest


def run_linear(args) -> None:
    from eval.bundle import save_linear_heads
    from eval.probes import DEFAULT_C_GRID
    from eval.protocols import linear_protocol
    specs, tasks = prepare(args)
    guard_outputs([args.out / "linear" / f"{s.name}.json" for s in specs], args.overwrite)
    for spec in specs:
        train, val, test = (features_of(args, spec, s) for s in ("train", "val", "test"))
        result, preds = linear_protocol(train, val, test, tasks, policy=policy_of(args),
                                        c_grid=args.c_grid or DEFAULT_C_GRID,
                                        num_replicates=args.bootstrap, seed=args.seed, source=str(args.shards),
                                        probe=probe_options(args))
        result.update(run_context(args, spec, tasks))
        (args.out / "linear").mkdir(parents=True, exist_ok=True)
        save_predictions(args.out / "linear" / f"{spec.name}.npz", preds, tasks)
        save_linear_heads(args.out / "linear" / f"{spec.name}.heads.pt", preds["probe"], tasks, preds["val_targets"],
                          preds["val_pids"])
        write_json(args.out / "linear" / f"{spec.name}.json", result)
        log(f"linear {spec.name}: mean AUROC {fmt(result['mean_auroc'])} 95% CI {fmt_ci(result['mean_auroc_ci'])}")


def run_fewshot(args) -> None:
    from eval.protocols import fewshot_protocol
    specs, tasks = prepare(args)
    guard_outputs([args.out / "fewshot" / f"{s.name}-k{args.k}.json" for s in specs], args.overwrite)
    for spec in specs:
        train, test = features_of(args, spec, "train"), features_of(args, spec, "test")
        result = fewshot_protocol(train, test, tasks, k=args.k, num_seeds=args.seeds, policy=policy_of(args), c=args.c,
                                  seed=args.seed, source=str(args.shards), probe=probe_options(args))
        result.update(run_context(args, spec, tasks))
        write_json(args.out / "fewshot" / f"{spec.name}-k{args.k}.json", result)
        m = result["mean_auroc"]
        log(f"fewshot k={args.k} {spec.name}: mean AUROC {fmt(m and m['auroc'])} +- {fmt(m and m['auroc_std'])} "
             f"over {args.seeds} seeds")


def _finetune_cfg(args):
    from eval.finetune import FinetuneConfig, augment_config
    try:
        augment = augment_config(args.augment, crop_scale_min=args.crop_scale_min, hflip_prob=args.hflip_prob)
    except ValueError as e:
        raise UsageError(f"--augment {args.augment}: {e}") from None
    return FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          augment=augment, max_images_in_memory=args.max_images_in_memory, seed=args.seed)


def run_finetune(args) -> None:
    from eval.bootstrap import bootstrap_ci
    from eval.finetune import finetune
    from eval.protocols import merge_ci
    specs, tasks = prepare(args)
    grid = parse_grid(args.grid)
    guard_outputs([args.out / "finetune" / f"{s.name}.json" for s in specs], args.overwrite)
    label_names = load_manifest(args.shards).label_names
    for spec in specs:
        result, preds, state = finetune(spec, args.shards, tasks, label_names, _finetune_cfg(args), grid=grid,
                                        policy=policy_of(args), device=args.device, transform=transform_of(args),
                                        num_threads=args.num_threads, log=log)
        result = merge_ci(result, bootstrap_ci(preds["targets"], preds["scores"], preds["pids"], tasks,
                                               num_replicates=args.bootstrap, seed=args.seed))
        result.update(run_context(args, spec, tasks))
        (args.out / "finetune").mkdir(parents=True, exist_ok=True)
        save_predictions(args.out / "finetune" / f"{spec.name}.npz", preds, tasks)
        _save_finetuned(args.out / "finetune" / f"{spec.name}.pt", state, spec, tasks, result)
        write_json(args.out / "finetune" / f"{spec.name}.json", result)
        log(f"finetune {spec.name}: mean AUROC {fmt(result['mean_auroc'])} 95% CI {fmt_ci(result['mean_auroc_ci'])}")


def _save_finetuned(path: Path, state: dict, spec: EncoderSpec, tasks: list[str], result: dict) -> None:
    # The selected checkpoint (best validation mean AUROC), loadable with torch.load(weights_only=True); "backbone"
    # loads into the torchvision model (strict except fc): the ImageNet input adapter (module "0.", no weights) and
    # its Sequential prefix are dropped, as is a ViT's ViTFeatures prefix "backbone." (timm names, as encoder.pt).
    import torch
    backbone = state["backbone"]
    if spec.kind == "imagenet":
        backbone = {k[2:]: v for k, v in backbone.items() if k.startswith("1.")}
    if spec.vit_features is not None:
        backbone = {k[len("backbone."):]: v for k, v in backbone.items()}
    doc = {"arch": spec.arch, "in_channels": spec.in_channels, "encoder": spec.name, "category": spec.category,
           "vit_features": spec.vit_features,
           "tasks": list(tasks), "lr": result["chosen_lr"], "weight_decay": result["chosen_weight_decay"],
           "epoch": result["best_epoch"], "backbone": backbone, "head": state["head"]}
    with atomic_write(path) as f:
        torch.save(doc, f)


def run_fractions(args) -> None:
    from eval.probes import DEFAULT_C_GRID
    from eval.protocols import fractions_linear
    specs, tasks = prepare(args)
    modes = ("linear", "finetune") if args.mode == "both" else (args.mode,)
    guard_outputs([args.out / "fractions" / f"{s.name}-{m}.json" for s in specs for m in modes], args.overwrite)
    for spec in specs:
        if "linear" in modes:
            train, val, test = (features_of(args, spec, s) for s in ("train", "val", "test"))
            result = fractions_linear(train, val, test, tasks, fractions=args.fractions, num_seeds=args.seeds,
                                      policy=policy_of(args), c_grid=args.c_grid or DEFAULT_C_GRID,
                                      num_replicates=args.bootstrap, seed=args.seed, source=str(args.shards),
                                      probe=probe_options(args), val_policy=args.val_policy,
                                      val_min_per_class=args.val_min_per_class)
            result.update(run_context(args, spec, tasks))
            write_json(args.out / "fractions" / f"{spec.name}-linear.json", result)
            log(f"fractions linear {spec.name}: "
                 + ", ".join(f"{c['fraction']:g}: {c['mean_auroc']:.3f}" for c in result["curve"]))
        if "finetune" in modes:
            result = _fractions_finetune(args, spec, tasks)
            result.update(run_context(args, spec, tasks))
            write_json(args.out / "fractions" / f"{spec.name}-finetune.json", result)


def _fractions_finetune(args, spec: EncoderSpec, tasks: list[str]) -> dict:
    from eval.bootstrap import bootstrap_mean_over_runs
    from eval.finetune import finetune
    from eval.labels import select_targets
    from eval.protocols import val_policy_json, val_selection
    from eval.sampling import fraction_subsets, split_patient_ids
    from dali_pipes.labelled import build_labelled_index
    label_names = load_manifest(args.shards).label_names
    policy = policy_of(args)
    train_pids = split_patient_ids(args.shards, "train")
    val_index = build_labelled_index(args.shards, "val")
    y_va = select_targets(val_index.raw_labels(), label_names, tasks, policy)
    runs: dict[float, list] = {f: [] for f in args.fractions}
    targets = test_pids = None
    for s in range(args.seeds):
        subsets = fraction_subsets(train_pids, tuple(args.fractions), args.seed + s)
        for f in sorted(args.fractions):
            cfg = _finetune_cfg(args)
            cfg.seed = args.seed + s
            vidx, vinfo = val_selection(val_index.pid, y_va, f, args.seed + s, args.val_policy, args.val_min_per_class)
            result, preds, _ = finetune(spec, args.shards, tasks, label_names, cfg, grid=parse_grid(args.grid),
                                        policy=policy, device=args.device, transform=transform_of(args),
                                        train_patients=np.unique(train_pids[subsets[f]]),
                                        val_patients=np.unique(val_index.pid[vidx]), num_threads=args.num_threads,
                                        log=log)
            targets, test_pids = preds["targets"], preds["pids"]
            counts = {t: {k: v for k, v in row.items() if k.startswith(("n_train", "n_val"))}
                      for t, row in result["tasks"].items()}
            runs[f].append({"scores": preds["scores"], "mean_auroc": result["mean_auroc"], "lr": result["chosen_lr"],
                            "weight_decay": result["chosen_weight_decay"], "num_images": int(result["train_images"]),
                            "val": vinfo, "counts": counts})
    curve = []
    for f in sorted(args.fractions):
        vals = np.array([r["mean_auroc"] if r["mean_auroc"] is not None else np.nan for r in runs[f]])
        curve.append({"fraction": f, "mean_auroc": float(np.nanmean(vals)), "per_seed": vals.tolist(),
                      "seed_std": float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0,
                      "mean_auroc_ci": bootstrap_mean_over_runs(targets, [r["scores"] for r in runs[f]], test_pids,
                                                                num_replicates=args.bootstrap, seed=args.seed),
                      "num_images": [r["num_images"] for r in runs[f]],
                      "chosen": [[r["lr"], r["weight_decay"]] for r in runs[f]],
                      "val_selection": [r["val"] for r in runs[f]], "label_counts": [r["counts"] for r in runs[f]]})
    return {"protocol": "fractions", "mode": "finetune", "label_policy": policy.to_json(),
            "uncertainty": policy.uncertain, "num_seeds": args.seeds, "curve": curve,
            "val_policy": val_policy_json(args.val_policy, args.val_min_per_class),
            "notes": [], "ci": "patient bootstrap of the test set, runs averaged inside each replicate"}


def run_compare(args) -> None:
    from eval.bootstrap import paired_bootstrap
    folder = args.out / args.protocol
    out = args.out / "compare" / f"{args.a}-vs-{args.b}-{args.protocol}.json"
    guard_outputs([out], args.overwrite)
    loaded = []
    for name in (args.a, args.b):
        path = folder / f"{name}.npz"
        if not path.is_file():
            raise UsageError(f"{path}: no stored predictions for '{name}'; "
                             f"run `python -m eval {args.protocol}` for it into {args.out} first")
        with np.load(path) as z:
            loaded.append({k: z[k] for k in z.files})
    a, b = loaded
    docs = [_result_doc(folder / f"{name}.json") for name in (args.a, args.b)]
    settings = [{"label_policy": d.get("label_policy"), "eval_view": d.get("eval_view")} for d in docs]
    if settings[0] != settings[1]:
        raise UsageError(f"{args.a} and {args.b} were evaluated under different settings ({settings[0]} vs "
                         f"{settings[1]}); re-run one with the other's --blank / --uncertainty / --eval-view")
    if list(a["tasks"]) != list(b["tasks"]) or a["pids"].shape != b["pids"].shape \
            or not np.array_equal(a["pids"], b["pids"]) \
            or not np.array_equal(a["targets"], b["targets"], equal_nan=True):
        raise UsageError(f"{args.a} and {args.b} were not scored on the same test samples and tasks; "
                         "re-run both on the same shards")
    tasks = [str(t) for t in a["tasks"]]
    result = paired_bootstrap(a["targets"], a["scores"], b["scores"], a["pids"], tasks,
                              num_replicates=args.bootstrap, seed=args.seed)
    # Recorded beside the comparison, not required to match: CLS against mean-token features of one encoder is
    # itself a question worth asking.
    features = [(d.get("encoder") or {}).get("vit_features") for d in docs]
    result.update(protocol=args.protocol, a=args.a, b=args.b, task_names=tasks,
                  a_vit_features=features[0], b_vit_features=features[1])
    write_json(out, result)
    m = result["mean_auroc"]
    log(f"compare {args.a} - {args.b} ({args.protocol}): mean AUROC diff {fmt(m['diff'])} "
         f"95% CI {fmt_ci(m['ci'])} p={fmt(m['p_value'])}")


def _result_doc(path: Path) -> dict:
    """A stored result (its settings and encoder record); empty where the JSON is missing."""
    return json.loads(path.read_text()) if path.is_file() else {}


def run_report(args) -> None:
    from eval.report import write_report
    paths = write_report(args.out, overwrite=args.overwrite)
    log("report: " + ", ".join(str(p) for p in paths))
