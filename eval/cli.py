"""Orchestration for `python -m eval {linear,fewshot,fractions,finetune,compare,report}`.

Results land in one eval folder: OUT/<protocol>/<encoder>.json (+ .npz test predictions), OUT/compare/,
and `report` writes OUT/report.md, OUT/report.json and the PNG figures.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from eval.args import UsageError, build_parser, parse_grid
from eval.features import (EncoderError, EncoderSpec, Transform, default_device, encoder_hash, encoder_spec,
                           extract_features)
from eval.labels import LabelPolicy, TaskError, resolve_tasks
from ingest.schema import ShardFormatError, load_manifest


def _encoders(args) -> list[EncoderSpec]:
    specs = [encoder_spec(e, arch=args.arch, in_channels=args.in_channels, seed=args.seed) for e in args.encoder]
    specs += [encoder_spec(init=i, arch=args.arch or "resnet50", in_channels=args.in_channels, seed=args.seed)
              for i in args.init]
    if not specs:
        raise UsageError("no encoder: give --encoder PATH and/or --init random|imagenet")
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"two encoders share the name '{sorted(dup)[0]}' (run folders with the same name); "
                         "evaluate them into separate --out folders")
    return specs


def _guard(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise UsageError(f"{path}: finished output exists; pass --overwrite to replace it")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))
    tmp.replace(path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (Path,)):
        return str(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _save_predictions(path: Path, preds: dict, tasks: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, targets=preds["targets"], scores=preds["scores"], pids=preds["pids"], tasks=np.array(tasks))
    tmp.replace(path)


def _context(args, spec: EncoderSpec, tasks: list[str]) -> dict:
    return {"encoder": {"name": spec.name, "category": spec.category, "kind": spec.kind, "arch": spec.arch,
                        "in_channels": spec.in_channels, "path": str(spec.path) if spec.path else None,
                        "seed": spec.seed if spec.kind == "random" else None, "sha256": encoder_hash(spec)},
            "shards": str(args.shards.resolve()), "task_names": tasks, "device": args.device,
            "label_policy": _policy(args).to_json(), "eval_view": args.eval_view,
            "transform": _transform(args).as_dict(),
            "argv": getattr(args, "argv", sys.argv[1:]), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _transform(args) -> Transform:
    resize = args.resize_size or int(round(args.image_size * 8 / 7))
    return Transform(args.image_size, resize, view=args.eval_view)


def _policy(args) -> LabelPolicy:
    return LabelPolicy(blank=args.blank, uncertain=args.uncertainty)


def _features(args, spec: EncoderSpec, split: str):
    return extract_features(spec, args.shards, split, device=args.device, transform=_transform(args),
                            batch_size=args.batch_size, cache_dir=args.cache, num_threads=args.num_threads, log=_log)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prepare(args) -> tuple[list[EncoderSpec], list[str]]:
    manifest = load_manifest(args.shards)
    tasks = resolve_tasks(args.tasks, manifest.label_names, source=str(args.shards))
    for split in ("train", "val", "test"):
        if split not in manifest.splits():
            raise UsageError(f"{args.shards}: split '{split}' is empty or missing; "
                             "the protocols need train, val and test")
    args.device = default_device(args.device or _auto_device())
    args.cache = args.cache or args.out / "cache"
    return _encoders(args), tasks


def _probe(args) -> dict:
    backend = args.probe_backend
    if backend == "auto":
        backend = "torch" if args.device == "gpu" else "sklearn"
    return {"backend": backend, "device": args.device}


def _auto_device() -> str:
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def run_linear(args) -> None:
    from eval.bundle import save_linear_heads
    from eval.probes import DEFAULT_C_GRID
    from eval.protocols import linear_protocol
    specs, tasks = _prepare(args)
    _guard([args.out / "linear" / f"{s.name}.json" for s in specs], args.overwrite)
    for spec in specs:
        train, val, test = (_features(args, spec, s) for s in ("train", "val", "test"))
        result, preds = linear_protocol(train, val, test, tasks, policy=_policy(args),
                                        c_grid=args.c_grid or DEFAULT_C_GRID,
                                        num_replicates=args.bootstrap, seed=args.seed, source=str(args.shards),
                                        probe=_probe(args))
        result.update(_context(args, spec, tasks))
        (args.out / "linear").mkdir(parents=True, exist_ok=True)
        _save_predictions(args.out / "linear" / f"{spec.name}.npz", preds, tasks)
        save_linear_heads(args.out / "linear" / f"{spec.name}.heads.pt", preds["probe"], tasks, preds["val_targets"])
        _write_json(args.out / "linear" / f"{spec.name}.json", result)
        _log(f"linear {spec.name}: mean AUROC {_fmt(result['mean_auroc'])} 95% CI {_fmt_ci(result['mean_auroc_ci'])}")


def run_fewshot(args) -> None:
    from eval.protocols import fewshot_protocol
    specs, tasks = _prepare(args)
    _guard([args.out / "fewshot" / f"{s.name}-k{args.k}.json" for s in specs], args.overwrite)
    for spec in specs:
        train, test = _features(args, spec, "train"), _features(args, spec, "test")
        result = fewshot_protocol(train, test, tasks, k=args.k, num_seeds=args.seeds, policy=_policy(args), c=args.c,
                                  seed=args.seed, source=str(args.shards), probe=_probe(args))
        result.update(_context(args, spec, tasks))
        _write_json(args.out / "fewshot" / f"{spec.name}-k{args.k}.json", result)
        m = result["mean_auroc"]
        _log(f"fewshot k={args.k} {spec.name}: mean AUROC {_fmt(m and m['auroc'])} +- {_fmt(m and m['auroc_std'])} "
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
    specs, tasks = _prepare(args)
    grid = parse_grid(args.grid)
    _guard([args.out / "finetune" / f"{s.name}.json" for s in specs], args.overwrite)
    label_names = load_manifest(args.shards).label_names
    for spec in specs:
        result, preds, state = finetune(spec, args.shards, tasks, label_names, _finetune_cfg(args), grid=grid,
                                        policy=_policy(args), device=args.device, transform=_transform(args),
                                        num_threads=args.num_threads, log=_log)
        result = merge_ci(result, bootstrap_ci(preds["targets"], preds["scores"], preds["pids"], tasks,
                                               num_replicates=args.bootstrap, seed=args.seed))
        result.update(_context(args, spec, tasks))
        (args.out / "finetune").mkdir(parents=True, exist_ok=True)
        _save_predictions(args.out / "finetune" / f"{spec.name}.npz", preds, tasks)
        _save_finetuned(args.out / "finetune" / f"{spec.name}.pt", state, spec, tasks, result)
        _write_json(args.out / "finetune" / f"{spec.name}.json", result)
        _log(f"finetune {spec.name}: mean AUROC {_fmt(result['mean_auroc'])} 95% CI {_fmt_ci(result['mean_auroc_ci'])}")


def _save_finetuned(path: Path, state: dict, spec: EncoderSpec, tasks: list[str], result: dict) -> None:
    # The selected checkpoint (best validation mean AUROC), loadable with torch.load(weights_only=True); "backbone"
    # loads into the torchvision model (strict except fc): the ImageNet input adapter (module "0.", no weights) and
    # its Sequential prefix are dropped.
    import torch
    backbone = state["backbone"]
    if spec.kind == "imagenet":
        backbone = {k[2:]: v for k, v in backbone.items() if k.startswith("1.")}
    doc = {"arch": spec.arch, "in_channels": spec.in_channels, "encoder": spec.name, "category": spec.category,
           "tasks": list(tasks), "lr": result["chosen_lr"], "weight_decay": result["chosen_weight_decay"],
           "epoch": result["best_epoch"], "backbone": backbone, "head": state["head"]}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(doc, tmp)
    tmp.replace(path)


def run_fractions(args) -> None:
    from eval.probes import DEFAULT_C_GRID
    from eval.protocols import fractions_linear
    specs, tasks = _prepare(args)
    modes = ("linear", "finetune") if args.mode == "both" else (args.mode,)
    _guard([args.out / "fractions" / f"{s.name}-{m}.json" for s in specs for m in modes], args.overwrite)
    for spec in specs:
        if "linear" in modes:
            train, val, test = (_features(args, spec, s) for s in ("train", "val", "test"))
            result = fractions_linear(train, val, test, tasks, fractions=args.fractions, num_seeds=args.seeds,
                                      policy=_policy(args), c_grid=args.c_grid or DEFAULT_C_GRID,
                                      num_replicates=args.bootstrap, seed=args.seed, source=str(args.shards),
                                      probe=_probe(args), val_policy=args.val_policy,
                                      val_min_per_class=args.val_min_per_class)
            result.update(_context(args, spec, tasks))
            _write_json(args.out / "fractions" / f"{spec.name}-linear.json", result)
            _log(f"fractions linear {spec.name}: "
                 + ", ".join(f"{c['fraction']:g}: {c['mean_auroc']:.3f}" for c in result["curve"]))
        if "finetune" in modes:
            result = _fractions_finetune(args, spec, tasks)
            result.update(_context(args, spec, tasks))
            _write_json(args.out / "fractions" / f"{spec.name}-finetune.json", result)


def _fractions_finetune(args, spec: EncoderSpec, tasks: list[str]) -> dict:
    from eval.bootstrap import bootstrap_mean_over_runs
    from eval.finetune import finetune
    from eval.labels import select_targets
    from eval.protocols import val_policy_json, val_selection
    from eval.sampling import fraction_subsets, split_patient_ids
    from dali_pipes.labelled import build_labelled_index
    label_names = load_manifest(args.shards).label_names
    policy = _policy(args)
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
                                        policy=policy, device=args.device, transform=_transform(args),
                                        train_patients=np.unique(train_pids[subsets[f]]),
                                        val_patients=np.unique(val_index.pid[vidx]), num_threads=args.num_threads,
                                        log=_log)
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
    _guard([out], args.overwrite)
    loaded = []
    for name in (args.a, args.b):
        path = folder / f"{name}.npz"
        if not path.is_file():
            raise UsageError(f"{path}: no stored predictions for '{name}'; "
                             f"run `python -m eval {args.protocol}` for it into {args.out} first")
        with np.load(path) as z:
            loaded.append({k: z[k] for k in z.files})
    a, b = loaded
    settings = [_settings(folder / f"{name}.json") for name in (args.a, args.b)]
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
    result.update(protocol=args.protocol, a=args.a, b=args.b, task_names=tasks)
    _write_json(out, result)
    m = result["mean_auroc"]
    _log(f"compare {args.a} - {args.b} ({args.protocol}): mean AUROC diff {_fmt(m['diff'])} "
         f"95% CI {_fmt_ci(m['ci'])} p={_fmt(m['p_value'])}")


def _settings(path: Path) -> dict:
    """The label policy and eval view a stored result was computed under (None where not recorded)."""
    doc = json.loads(path.read_text()) if path.is_file() else {}
    return {"label_policy": doc.get("label_policy"), "eval_view": doc.get("eval_view")}


def run_report(args) -> None:
    from eval.report import write_report
    paths = write_report(args.out, overwrite=args.overwrite)
    _log("report: " + ", ".join(str(p) for p in paths))


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _fmt_ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


RUNNERS = {"linear": run_linear, "fewshot": run_fewshot, "fractions": run_fractions, "finetune": run_finetune,
           "compare": run_compare, "report": run_report}


def _run_analysis(name: str):
    def run(args) -> None:
        from eval import cli_analysis  # knn, transfer, neighbours, map (imports this module: loaded on first use)
        getattr(cli_analysis, f"run_{name}")(args)
    return run


RUNNERS.update({name: _run_analysis(name) for name in ("knn", "transfer", "neighbours", "map")})


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command not in RUNNERS:
        print(f"eval: unknown subcommand '{command}'", file=sys.stderr)
        return 2
    try:
        args = build_parser(command).parse_args(rest)
    except SystemExit as e:  # --help (0) or a one-line argument error (2), already printed
        return int(e.code or 0)
    args.argv = list(argv)  # recorded in every result JSON
    try:
        RUNNERS[command](args)
    except (UsageError, TaskError, EncoderError, ShardFormatError, FileNotFoundError, FileExistsError,
            ImportError) as e:
        print(f"eval {command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
