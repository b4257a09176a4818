"""Frozen-feature protocols: linear probe, k-shot (k positives + k negatives, many seeds, whole test split) and the
linear half of the label-fraction curve (validation fraction-matched). Each returns a JSON-ready dict (+ predictions).
"""
from __future__ import annotations

import numpy as np

from eval.bootstrap import bootstrap_ci, bootstrap_mean_over_runs
from eval.features import FeatureSet
from eval.labels import LabelPolicy, check_labelled, label_counts, select_targets, split_counts
from eval.metrics import auroc, balanced_accuracy, evaluate
from eval.probes import DEFAULT_C_GRID, feature_scale, fit_linear_probes
from eval.sampling import DEFAULT_VAL_MIN_PER_CLASS, fraction_subsets, kshot_indices, matched_val_subset

VAL_POLICIES = ("matched", "full")


def targets_of(fs: FeatureSet, tasks: list[str], policy: LabelPolicy, split: str, source: str, *,
               require: bool = True) -> np.ndarray:
    t = select_targets(fs.labels, fs.label_names, tasks, policy)
    if require:
        check_labelled(t, tasks, split, source)
    return t


def merge_ci(evaluation: dict, ci: dict) -> dict:
    """Put the bootstrap CIs beside the point estimates of ``Evaluation.to_dict()``."""
    evaluation["mean_auroc_ci"] = ci["mean_auroc_ci"]
    for name, row in evaluation["tasks"].items():
        row.update({k: v for k, v in ci["tasks"].get(name, {}).items() if k.endswith("_ci")})
    evaluation["bootstrap"] = {k: ci[k] for k in ("num_replicates", "seed", "level", "unit", "num_degenerate")}
    return evaluation


def add_counts(result: dict, counts: dict[str, dict[str, int]]) -> dict:
    """Put per-task ``n_<split>_pos`` / ``n_<split>_neg`` beside each task's metrics in ``result["tasks"]``."""
    for name, row in result["tasks"].items():
        row.update(counts.get(name, {}))
    return result


def linear_protocol(train: FeatureSet, val: FeatureSet, test: FeatureSet, tasks: list[str], *,
                    policy: LabelPolicy, c_grid=DEFAULT_C_GRID, num_replicates: int = 1000,
                    seed: int = 0, source: str = "shards", probe: dict | None = None) -> tuple[dict, dict]:
    """Logistic-regression probe per task (C on val), test AUROC/AUPRC with patient-bootstrap CIs.
    Returns (result dict, predictions {"targets", "scores", "pids"} on the test split)."""
    y_tr = targets_of(train, tasks, policy, "train", source)
    y_va = targets_of(val, tasks, policy, "val", source, require=False)
    y_te = targets_of(test, tasks, policy, "test", source)
    fitted = fit_linear_probes(train.features, y_tr, test.features, tasks, val_x=val.features, val_y=y_va,
                               c_grid=c_grid, seed=seed, **(probe or {}))
    ev = evaluate(y_te, fitted.test_scores, tasks)
    result = merge_ci(ev.to_dict(), bootstrap_ci(y_te, fitted.test_scores, test.pids, tasks,
                                                 num_replicates=num_replicates, seed=seed))
    add_counts(result, split_counts({"train": y_tr, "val": y_va, "test": y_te}, tasks))
    result["notes"] = fitted.notes + result["notes"]
    result.update(protocol="linear", chosen_c=fitted.chosen_c, val_auroc=fitted.val_auroc,
                  label_policy=policy.to_json(), uncertainty=policy.uncertain,
                  num_images={"train": len(train), "val": len(val), "test": len(test)},
                  num_patients={s: int(len(np.unique(f.pids)))
                                for s, f in (("train", train), ("val", val), ("test", test))})
    # "probe" (weights, standardisation, val scores) feeds `eval export`; "val_targets" for its thresholds.
    return result, {"targets": y_te, "scores": fitted.test_scores, "pids": test.pids, "probe": fitted,
                    "val_targets": y_va, "val_pids": val.pids}


def fewshot_protocol(train: FeatureSet, test: FeatureSet, tasks: list[str], *, k: int = 10, num_seeds: int = 20,
                     policy: LabelPolicy, c: float = 1.0, seed: int = 0, source: str = "shards",
                     probe: dict | None = None) -> dict:
    """k positives + k negatives per task (distinct patients), a probe with fixed C (no validation labels in a
    k-shot budget) on features standardised with the whole training split (its features, not its labels), scored
    on every labelled test image (AUROC needs no balance) with balanced accuracy beside it; mean, sd, 95% interval
    of the mean and 2.5-97.5 percentile range over seeds."""
    y_tr = targets_of(train, tasks, policy, "train", source)
    y_te = targets_of(test, tasks, policy, "test", source)
    # Scale from the whole training split (features only); only the 2k drawn rows are scaled per draw, so a
    # 200k-image split is never copied whole in float64.
    mean, std = feature_scale(train.features)  # (D,), (D,)
    te_all = (test.features - mean) / std      # (N_test, D)
    per_task: dict[str, dict] = {}
    aurocs = np.full((num_seeds, len(tasks)), np.nan)
    baccs = np.full_like(aurocs, np.nan)
    notes = []
    test_counts = label_counts(y_te, tasks)
    for j, name in enumerate(tasks):
        if test_counts[name]["pos"] == 0 or test_counts[name]["neg"] == 0:
            notes.append(f"{name}: skipped: test split has one class")
            continue
        keep = ~np.isnan(y_te[:, j])
        for s in range(num_seeds):
            idx = kshot_indices(y_tr[:, [j]], train.pids, k, seed + s)[0]
            if idx is None:
                notes.append(f"{name}: skipped: fewer than {k} positive and {k} negative training patients")
                break
            x = (train.features[idx] - mean) / std  # (2k, D)
            fitted = fit_linear_probes(x, y_tr[idx][:, [j]], te_all[keep], [name], fixed_c=c, seed=seed + s,
                                       prescaled=True, **(probe or {}))
            p = fitted.test_scores[:, 0]
            aurocs[s, j] = auroc(y_te[keep, j], p)
            baccs[s, j] = balanced_accuracy(y_te[keep, j], p)
        if np.isfinite(aurocs[:, j]).all():
            per_task[name] = {**_spread(aurocs[:, j], "auroc"), **_spread(baccs[:, j], "balanced_accuracy"),
                              "n_test_pos": test_counts[name]["pos"], "n_test_neg": test_counts[name]["neg"],
                              "n_train_pos": k, "n_train_neg": k}
    done = [j for j, t in enumerate(tasks) if t in per_task]
    return {"protocol": "fewshot", "k": k, "num_seeds": num_seeds, "C": c, "C_tuned": False,
            "label_policy": policy.to_json(), "uncertainty": policy.uncertain, "tasks": per_task,
            "test_set": "every labelled test image (not balanced)", "threshold": 0.5,
            "standardisation": "mean / std of the whole training split's features (labels unused)",
            "mean_auroc": _spread(aurocs[:, done].mean(axis=1), "auroc") if done else None,
            "mean_balanced_accuracy": _spread(baccs[:, done].mean(axis=1), "balanced_accuracy") if done else None,
            "notes": notes, "per_seed_auroc": {t: aurocs[:, j].tolist() for j, t in enumerate(tasks) if t in per_task}}


def _spread(values: np.ndarray, name: str) -> dict:
    """Mean, sd, a t-interval of the mean (95%) and the 2.5-97.5 percentile range of per-seed ``values``."""
    from scipy import stats
    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    half = float(stats.t.ppf(0.975, v.size - 1) * sd / np.sqrt(v.size)) if v.size > 1 else 0.0
    return {name: float(v.mean()), f"{name}_std": sd, f"{name}_ci95": [float(v.mean() - half), float(v.mean() + half)],
            f"{name}_range95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]}


def val_selection(val_pids: np.ndarray, y_va: np.ndarray, fraction: float, seed: int, val_policy: str,
                  min_per_class: int) -> tuple[np.ndarray, dict]:
    """Validation rows used to choose C / epoch / grid cell at ``fraction``, and their JSON description."""
    if val_policy not in VAL_POLICIES:
        raise ValueError(f"unknown validation policy '{val_policy}' (choose from {', '.join(VAL_POLICIES)})")
    if val_policy == "full":
        idx = np.arange(len(val_pids))
        info = {"num_images": int(len(idx)), "num_patients": int(len(np.unique(val_pids))), "enlarged": False}
    else:
        sub = matched_val_subset(val_pids, y_va, fraction, seed, min_per_class)
        idx, info = sub.indices, sub.to_json()
    return idx, info


def fractions_linear(train: FeatureSet, val: FeatureSet, test: FeatureSet, tasks: list[str], *, fractions,
                     num_seeds: int = 3, policy: LabelPolicy, c_grid=DEFAULT_C_GRID,
                     num_replicates: int = 1000, seed: int = 0, source: str = "shards", probe: dict | None = None,
                     val_policy: str = "matched", val_min_per_class: int = DEFAULT_VAL_MIN_PER_CLASS) -> dict:
    """Linear probe on nested patient-level label fractions of the training split, several sampling seeds; C is
    chosen on the fraction-matched validation subset (``val_policy="matched"``) or on all of val (``"full"``).
    A task a small fraction cannot train (one class) scores as chance (0.5) for that run, with a note."""
    y_tr = targets_of(train, tasks, policy, "train", source)
    y_va = targets_of(val, tasks, policy, "val", source, require=False)
    y_te = targets_of(test, tasks, policy, "test", source)
    runs: dict[float, list] = {f: [] for f in fractions}
    notes: list[str] = []
    subsets_by_seed = [fraction_subsets(train.pids, tuple(fractions), seed + s) for s in range(num_seeds)]
    for s, subsets in enumerate(subsets_by_seed):
        for f in sorted(fractions):
            idx = subsets[f]
            vidx, vinfo = val_selection(val.pids, y_va, f, seed + s, val_policy, val_min_per_class)
            fitted = fit_linear_probes(train.features[idx], y_tr[idx], test.features, tasks, val_x=val.features[vidx],
                                       val_y=y_va[vidx], c_grid=c_grid, seed=seed + s, **(probe or {}))
            scores = fitted.test_scores.copy()
            untrained = np.isnan(scores).all(axis=0)
            scores[:, untrained] = 0.5
            notes += [f"fraction {f:g}, seed {seed + s}: {n} (scored as chance)"
                      for n in fitted.notes if "not trained" in n]
            counts = split_counts({"train": y_tr[idx], "val": y_va[vidx]}, tasks)
            runs[f].append({"scores": scores, "num_images": int(len(idx)),
                            "num_patients": int(len(np.unique(train.pids[idx]))),
                            "mean_auroc": evaluate(y_te, scores, tasks).mean_auroc, "counts": counts,
                            "val": vinfo, "chosen_c": fitted.chosen_c})
    curve = []
    for f in sorted(fractions):
        vals = np.array([r["mean_auroc"] for r in runs[f]])
        ci = bootstrap_mean_over_runs(y_te, [r["scores"] for r in runs[f]], test.pids, num_replicates=num_replicates,
                                      seed=seed)
        per_task = {}
        for j, t in enumerate(tasks):
            task_vals = [evaluate(y_te[:, [j]], r["scores"][:, [j]], [t]).tasks[0].auroc for r in runs[f]]
            per_task[t] = float(np.mean(task_vals)) if np.isfinite(task_vals).all() else None
        curve.append({"fraction": f, "mean_auroc": float(np.mean(vals)),
                      "seed_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                      "mean_auroc_ci": ci, "per_seed": vals.tolist(), "tasks": per_task,
                      "num_images": [r["num_images"] for r in runs[f]],
                      "num_patients": [r["num_patients"] for r in runs[f]],
                      "val_selection": [r["val"] for r in runs[f]], "chosen_c": [r["chosen_c"] for r in runs[f]],
                      "label_counts": [r["counts"] for r in runs[f]]})
    return {"protocol": "fractions", "mode": "linear", "label_policy": policy.to_json(),
            "uncertainty": policy.uncertain, "num_seeds": num_seeds, "curve": curve, "notes": notes,
            "val_policy": val_policy_json(val_policy, val_min_per_class),
            "test_counts": split_counts({"test": y_te}, tasks),
            "ci": "patient bootstrap of the test set, runs averaged inside each replicate"}


def val_policy_json(val_policy: str, min_per_class: int) -> dict:
    if val_policy == "full":
        return {"policy": "full", "description": "C / epoch / grid cell chosen on the whole validation split"}
    return {"policy": "matched", "min_per_class": min_per_class,
            "description": f"validation patients subsampled to the training fraction (same seed, nested), enlarged "
                           f"until each task has >= {min_per_class} positive and >= {min_per_class} negative images "
                           f"(or all the split has)"}
