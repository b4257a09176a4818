"""Orchestration for `python -m eval {knn,transfer,neighbours,map}`: OUT/knn/<encoder>.json (+ .npz),
OUT/transfer/<encoder>.json (+ -source.npz / -target.npz, paired/), OUT/neighbours/ and OUT/map/ PNG + CSV.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path

import numpy as np

from eval.arg_types import UsageError
from eval.cli_common import (features_of, fmt, guard_outputs, local_shards, log, policy_of, prepare, probe_options,
                             run_context, save_predictions, shards_record, transform_of, write_json)
from ingest.remote import is_remote
from eval.labels import TaskError
from ingest.schema import load_manifest


def _splitfeatures_of(args, spec, split: str, shards: Path | None = None):
    """Frozen features of one split. The eval view (args.eval_view) reaches feature extraction here and only here,
    through eval.cli_common's feature path, so these subcommands see exactly the images the other protocols see."""
    a = args if shards is None else argparse.Namespace(**{**vars(args), "shards": shards})
    return features_of(a, spec, split)


def _record(result: dict, args, spec, tasks: list[str]) -> dict:
    result.update(run_context(args, spec, tasks))  # encoder, shards, label_policy, eval_view, transform, argv
    return result


def run_knn(args) -> None:
    from eval.knn import KnnError, knn_protocol
    specs, tasks = prepare(args)
    guard_outputs([args.out / "knn" / f"{s.name}.json" for s in specs], args.overwrite)
    for spec in specs:
        train, val, test = (_splitfeatures_of(args, spec, s) for s in ("train", "val", "test"))
        try:
            result, preds = knn_protocol(train, val, test, tasks, policy=policy_of(args), k=args.k,
                                         temperature=args.temperature, device=args.device,
                                         chunk_elements=args.chunk_elements, num_replicates=args.bootstrap,
                                         seed=args.seed, source=str(args.shards))
        except KnnError as e:
            raise UsageError(f"--k {args.k}: {e}") from None
        _record(result, args, spec, tasks)
        (args.out / "knn").mkdir(parents=True, exist_ok=True)
        save_predictions(args.out / "knn" / f"{spec.name}.npz", preds, tasks)
        write_json(args.out / "knn" / f"{spec.name}.json", result)
        log(f"knn k={args.k} T={args.temperature:g} {spec.name}: mean AUROC {fmt(result['mean_auroc'])}")


def _targetfeatures_of(args, spec, splits: list[str]):
    from eval.transfer import concat_features
    return concat_features([_splitfeatures_of(args, spec, s, args.target_shards) for s in splits])


def run_transfer(args) -> None:
    from eval.bootstrap import paired_bootstrap
    from eval.probes import DEFAULT_C_GRID
    from eval.transfer import map_tasks, parse_task_map, transfer_protocol
    specs, tasks = prepare(args)
    if is_remote(args.target_shards):
        args.target_shards_location = str(args.target_shards)
        args.target_shards = local_shards(args, args.target_shards)
    source, target = str(args.shards), str(args.target_shards)
    src_names, tgt_manifest = load_manifest(args.shards).label_names, load_manifest(args.target_shards)
    if not tgt_manifest.label_names:
        raise TaskError(f"{target}: target shards carry no labels; nothing to score the shifted AUROC on")
    mapping, map_notes = map_tasks(tasks, args.tasks.strip() not in ("", "all"), src_names, tgt_manifest.label_names,
                                   parse_task_map(args.task_map), source=source, target=target)
    # The target's test split when it has one; a dataset without a split is evaluated whole.
    tgt_splits = ["test"] if "test" in tgt_manifest.splits() else tgt_manifest.splits()
    if not tgt_splits:
        raise UsageError(f"{target}: target shards hold no samples")
    folder = args.out / "transfer"
    names = [s.name for s in specs] + ([f"{s.name}-finetuned" for s in specs] if args.finetuned else [])
    guard_outputs([folder / f"{n}.json" for n in names], args.overwrite)
    for spec in specs if args.finetuned else []:  # fail before any work, not after the linear results are written
        ckpt = args.out / "finetune" / f"{spec.name}.pt"
        if not ckpt.is_file():
            raise UsageError(f"{ckpt}: no fine-tuned checkpoint; run `python -m eval finetune` for {spec.name} first")
    shifted_preds = {}
    for spec in specs:
        train, val, test = (_splitfeatures_of(args, spec, s) for s in ("train", "val", "test"))
        tgt = _targetfeatures_of(args, spec, tgt_splits)
        result, p_in, p_sh = transfer_protocol(train, val, test, tgt, mapping, policy=policy_of(args),
                                               c_grid=args.c_grid or DEFAULT_C_GRID, num_replicates=args.bootstrap,
                                               seed=args.seed, source=source, target_name=target,
                                               probe=probe_options(args))
        result["notes"] = map_notes + result["notes"]
        result.update(target_shards=shards_record(args, "target_shards"), target_splits=tgt_splits)
        _record(result, args, spec, list(mapping))
        folder.mkdir(parents=True, exist_ok=True)
        save_predictions(folder / f"{spec.name}-source.npz", p_in, list(mapping))
        save_predictions(folder / f"{spec.name}-target.npz", p_sh, list(mapping))
        write_json(folder / f"{spec.name}.json", result)
        shifted_preds[spec.name] = p_sh
        _log_transfer(spec.name, result)
        if args.finetuned:
            shifted_preds[f"{spec.name}-finetuned"] = _transfer_finetuned(args, spec, mapping, tgt_splits, map_notes)
    for a, b in itertools.combinations(list(shifted_preds), 2):
        if a.endswith("-finetuned") != b.endswith("-finetuned"):
            continue  # encoders are compared under the same protocol
        pa, pb = shifted_preds[a], shifted_preds[b]
        cmp = paired_bootstrap(pa["targets"], pa["scores"], pb["scores"], pa["pids"], list(mapping),
                               num_replicates=args.bootstrap, seed=args.seed)
        cmp.update(a=a, b=b, protocol="transfer", evaluated_on="target", target_shards=target, task_names=list(mapping))
        write_json(folder / "paired" / f"{a}-vs-{b}.json", cmp)
        log(f"transfer paired {a} - {b} on the target: {fmt(cmp['mean_auroc']['diff'])}")


def _log_transfer(name: str, result: dict) -> None:
    log(f"transfer {name}: in-domain {fmt(result['in_domain']['mean_auroc'])}, shifted "
         f"{fmt(result['shifted']['mean_auroc'])}, drop {fmt(result['drop']['mean']['drop'])}")


def _transfer_finetuned(args, spec, mapping: dict[str, str], tgt_splits: list[str], map_notes: list[str]) -> dict:
    from eval.transfer import score_shift
    from eval.transfer_finetuned import load_finetuned, score_split
    name = f"{spec.name}-finetuned"
    ft_json = args.out / "finetune" / f"{spec.name}.json"
    model, head, ft_tasks = load_finetuned(args.out / "finetune" / f"{spec.name}.pt", spec)
    missing = [t for t in mapping if t not in ft_tasks]
    if missing:
        raise UsageError(f"{ft_json}: fine-tuned without task '{missing[0]}'; re-run finetune with the same --tasks")
    trained = json.loads(ft_json.read_text()) if ft_json.is_file() else {}
    if trained.get("shards") != shards_record(args):
        raise UsageError(f"{ft_json}: fine-tuned on {trained.get('shards')}, not on --shards {args.shards}")
    if trained.get("label_policy") not in (None, policy_of(args).to_json()):
        raise UsageError(f"{ft_json}: fine-tuned under label policy {trained['label_policy']}, "
                         f"not {policy_of(args).to_json()}; pass the same --blank / --uncertainty")
    kw = dict(spec=spec, transform=transform_of(args), device=args.device, batch_size=args.batch_size,
              num_threads=args.num_threads)
    cols = [ft_tasks.index(t) for t in mapping]
    src = score_split(model, head, args.shards, ["test"], cols, **kw)
    tgt = score_split(model, head, args.target_shards, tgt_splits, cols, **kw)
    result, p_in, p_sh = score_shift(src, tgt, mapping, policy=policy_of(args), num_replicates=args.bootstrap,
                                     seed=args.seed, target_name=str(args.target_shards))
    result.update(probe="finetuned", notes=list(map_notes), checkpoint=str(args.out / "finetune" / f"{spec.name}.pt"),
                  trained_label_policy=trained.get("label_policy"), target_shards=shards_record(args, "target_shards"),
                  target_splits=tgt_splits, chosen_lr=trained.get("chosen_lr"), best_epoch=trained.get("best_epoch"))
    _record(result, args, spec, list(mapping))
    folder = args.out / "transfer"
    save_predictions(folder / f"{name}-source.npz", p_in, list(mapping))
    save_predictions(folder / f"{name}-target.npz", p_sh, list(mapping))
    write_json(folder / f"{name}.json", result)
    _log_transfer(name, result)
    return p_sh


def run_neighbours(args) -> None:
    from eval.neighbours import neighbour_table, pick_queries, plot_neighbours
    from dali_pipes.shard_samples import SplitSamples
    specs, tasks = prepare(args)
    folder = args.out / "neighbours"
    guard_outputs([folder / f"{s.name}.png" for s in specs], args.overwrite)
    train_samples, test_samples = SplitSamples(args.shards, "train"), SplitSamples(args.shards, "test")
    if args.k > len(train_samples):
        raise UsageError(f"--k {args.k}: larger than the training bank ({len(train_samples)} images)")
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        train, test = _splitfeatures_of(args, spec, "train"), _splitfeatures_of(args, spec, "test")
        train_samples.check_rows(train.pids)
        test_samples.check_rows(test.pids)
        queries = pick_queries(len(test), args.queries, args.seed)
        table = neighbour_table(train, test, queries, args.k, device=args.device)
        rows = plot_neighbours(table, train_samples, test_samples, folder / f"{spec.name}.png", tasks=tasks,
                               title=f"{spec.category}: {spec.name} - {args.k} nearest training images (cosine), "
                                     f"eval view {args.eval_view}")
        _write_csv(folder / f"{spec.name}.csv", rows)
        log(f"neighbours {spec.name}: {folder / f'{spec.name}.png'}")


def _map_sources(args) -> list[tuple[Path, str]]:
    """(shard folder, split) pairs drawn on one map: --split of --shards, and of every --add-shards folder
    (all of its splits when it has no such split: a dataset without a split is drawn whole)."""
    pairs = [(args.shards, args.split)]
    for root in (local_shards(args, r) for r in args.add_shards):
        splits = load_manifest(root).splits()
        pairs += [(root, s) for s in ([args.split] if args.split in splits else splits)]
    return pairs


def run_map(args) -> None:
    from eval.embedmap import FIELDS, colour_values, embed_2d, plot_map
    from dali_pipes.shard_samples import SplitSamples
    specs, _ = prepare(args)
    folder = args.out / "map"
    stem = f"{args.split}-{args.method}-{_slug(args.color_by)}"
    guard_outputs([folder / f"{s.name}-{stem}.png" for s in specs], args.overwrite)
    label_names = load_manifest(args.shards).label_names
    if args.color_by not in label_names and args.color_by not in FIELDS:
        raise UsageError(f"--color-by '{args.color_by}': not a label of {args.shards} ({', '.join(label_names)}) "
                         f"nor {', '.join(FIELDS)}")
    sources = [(root, SplitSamples(root, split)) for root, split in _map_sources(args)]
    rows = [(j, i) for j, (_, samples) in enumerate(sources) for i in range(len(samples))]
    keep = np.arange(len(rows))
    if len(keep) > args.max_points:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(keep), args.max_points, replace=False))
    picked = [rows[r] for r in keep]
    metas = [sources[j][1].meta(i) for j, i in picked]
    keys = [sources[j][1].key(i) for j, i in picked]
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        feats, values = [], []
        for j, (root, samples) in enumerate(sources):
            fs = _splitfeatures_of(args, spec, samples.split, root)
            samples.check_rows(fs.pids, sample_every=max(1, len(samples) // 200))
            mine = [i for jj, i in picked if jj == j]
            feats.append(fs.features[mine])
            values += colour_values([metas[n] for n, (jj, _) in enumerate(picked) if jj == j], fs.labels[mine],
                                    fs.label_names, args.color_by, policy_of(args))
        coords = embed_2d(np.concatenate(feats), args.method, seed=args.seed)
        method = "t-SNE" if args.method == "tsne" else "PCA"
        where = ", ".join(f"{Path(r).name}/{s.split}" for r, s in sources)
        plot_map(coords, values, folder / f"{spec.name}-{stem}.png", legend_title=args.color_by,
                 title=f"{spec.category}: {spec.name}, {where}, {method} of L2-normalised features")
        _write_csv(folder / f"{spec.name}-{stem}.csv",
                   [{"key": k, "split": sources[j][1].split, "x": f"{c[0]:.6f}", "y": f"{c[1]:.6f}", args.color_by: v}
                    for k, (j, _), c, v in zip(keys, picked, coords, values)])
        log(f"map {spec.name}: {folder / f'{spec.name}-{stem}.png'}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["key"])
        w.writeheader()
        w.writerows(rows)
