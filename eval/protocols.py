"""Frozen-feature protocols: linear probe, k-shot (k positives + k negatives, many seeds, balanced test sets)
and the linear half of the label-fraction curve. Each returns a JSON-ready dict (+ test predictions).
"""
from __future__ import annotations

import numpy as np

from eval.bootstrap import bootstrap_ci, bootstrap_mean_over_runs
from eval.features import FeatureSet
from eval.labels import check_labelled, select_targets
from eval.metrics import accuracy, auroc, evaluate
from eval.probes import DEFAULT_C_GRID, fit_linear_probes
from eval.sampling import balanced_test_indices, fraction_subsets, kshot_indices


def targets_of(fs: FeatureSet, tasks: list[str], policy: str, split: str, source: str, *, require: bool = True) -> np.ndarray:
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


def linear_protocol(train: FeatureSet, val: FeatureSet, test: FeatureSet, tasks: list[str], *, policy: str = "u-ignore",
                    c_grid=DEFAULT_C_GRID, num_replicates: int = 1000, seed: int = 0, source: str = "shards",
                    probe: dict | None = None) -> tuple[dict, dict]:
    """Logistic-regression probe per task (C on val), test AUROC/AUPRC with patient-bootstrap CIs.
    Returns (result dict, predictions {"targets", "scores", "pids"} on the test split)."""
    y_tr = targets_of(train, tasks, policy, "train", source)
    y_va = targets_of(val, tasks, policy, "val", source, require=False)
    y_te = targets_of(test, tasks, policy, "test", source)
    fitted = fit_linear_probes(train.features, y_tr, test.features, tasks, val_x=val.features, val_y=y_va,
                              c_grid=c_grid, seed=seed, **(probe or {}))
    ev = evaluate(y_te, fitted.test_scores, tasks)
    result = merge_ci(ev.to_dict(), bootstrap_ci(y_te, fitted.test_scores, test.pids, tasks, num_replicates=num_replicates, seed=seed))
    result["notes"] = fitted.notes + result["notes"]
    result.update(protocol="linear", chosen_c=fitted.chosen_c, val_auroc=fitted.val_auroc, uncertainty=policy,
                  num_images={"train": len(train), "val": len(val), "test": len(test)},
                  num_patients={s: int(len(np.unique(f.pids))) for s, f in (("train", train), ("val", val), ("test", test))})
    # "probe" (weights, standardisation, val scores) feeds `eval export`; "val_targets" for its thresholds.
    return result, {"targets": y_te, "scores": fitted.test_scores, "pids": test.pids, "probe": fitted, "val_targets": y_va}


def fewshot_protocol(train: FeatureSet, test: FeatureSet, tasks: list[str], *, k: int = 10, num_seeds: int = 20,
                     policy: str = "u-ignore", c: float = 1.0, seed: int = 0, source: str = "shards",
                     probe: dict | None = None) -> dict:
    """k positives + k negatives per task (distinct patients), a probe with fixed C (no validation labels in a
    k-shot budget), scored on a balanced test set fixed across seeds; mean, spread and 95% range over seeds."""
    y_tr = targets_of(train, tasks, policy, "train", source)
    y_te = targets_of(test, tasks, policy, "test", source)
    per_task: dict[str, dict] = {}
    seed_means = []
    aurocs = np.full((num_seeds, len(tasks)), np.nan)
    accs = np.full_like(aurocs, np.nan)
    notes = []
    for j, name in enumerate(tasks):
        if np.nansum(y_te[:, j] == 1) == 0 or np.nansum(y_te[:, j] == 0) == 0:
            notes.append(f"{name}: skipped: test split has one class")
            continue
        test_idx = balanced_test_indices(y_te[:, j], seed)
        for s in range(num_seeds):
            idx = kshot_indices(y_tr[:, [j]], train.pids, k, seed + s)[0]
            if idx is None:
                notes.append(f"{name}: skipped: fewer than {k} positive and {k} negative training patients")
                break
            fitted = fit_linear_probes(train.features[idx], y_tr[idx][:, [j]], test.features[test_idx], [name], fixed_c=c,
                                       seed=seed + s, **(probe or {}))
            p = fitted.test_scores[:, 0]
            aurocs[s, j] = auroc(y_te[test_idx, j], p)
            accs[s, j] = accuracy(y_te[test_idx, j], p)
        if np.isfinite(aurocs[:, j]).all():
            per_task[name] = {**_spread(aurocs[:, j], "auroc"), **_spread(accs[:, j], "accuracy"),
                              "test_size": int(len(test_idx)), "test_balance": "1:1"}
    done = [j for j, t in enumerate(tasks) if t in per_task]
    if done:
        seed_means = aurocs[:, done].mean(axis=1)
    return {"protocol": "fewshot", "k": k, "num_seeds": num_seeds, "C": c, "uncertainty": policy, "tasks": per_task,
            "mean_auroc": _spread(np.asarray(seed_means), "auroc") if done else None,
            "mean_accuracy": _spread(accs[:, done].mean(axis=1), "accuracy") if done else None, "notes": notes,
            "per_seed_auroc": {t: aurocs[:, j].tolist() for j, t in enumerate(tasks) if t in per_task}}


def _spread(values: np.ndarray, name: str) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {name: float(v.mean()), f"{name}_std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            f"{name}_range95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]}


def fractions_linear(train: FeatureSet, val: FeatureSet, test: FeatureSet, tasks: list[str], *, fractions, num_seeds: int = 3,
                     policy: str = "u-ignore", c_grid=DEFAULT_C_GRID, num_replicates: int = 1000, seed: int = 0,
                     source: str = "shards", probe: dict | None = None) -> dict:
    """Linear probe on nested patient-level label fractions of the training split, several sampling seeds.
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
            fitted = fit_linear_probes(train.features[idx], y_tr[idx], test.features, tasks, val_x=val.features,
                                       val_y=y_va, c_grid=c_grid, seed=seed + s, **(probe or {}))
            scores = fitted.test_scores.copy()
            untrained = np.isnan(scores).all(axis=0)
            scores[:, untrained] = 0.5
            notes += [f"fraction {f:g}, seed {seed + s}: {n} (scored as chance)" for n in fitted.notes if "not trained" in n]
            runs[f].append({"scores": scores, "num_images": int(len(idx)), "num_patients": int(len(np.unique(train.pids[idx]))),
                            "mean_auroc": evaluate(y_te, scores, tasks).mean_auroc})
    curve = []
    for f in sorted(fractions):
        vals = np.array([r["mean_auroc"] for r in runs[f]])
        ci = bootstrap_mean_over_runs(y_te, [r["scores"] for r in runs[f]], test.pids, num_replicates=num_replicates, seed=seed)
        per_task = {}
        for j, t in enumerate(tasks):
            task_vals = [evaluate(y_te[:, [j]], r["scores"][:, [j]], [t]).tasks[0].auroc for r in runs[f]]
            per_task[t] = float(np.mean(task_vals)) if np.isfinite(task_vals).all() else None
        curve.append({"fraction": f, "mean_auroc": float(np.mean(vals)), "seed_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                      "mean_auroc_ci": ci, "per_seed": vals.tolist(), "tasks": per_task,
                      "num_images": [r["num_images"] for r in runs[f]], "num_patients": [r["num_patients"] for r in runs[f]]})
    return {"protocol": "fractions", "mode": "linear", "uncertainty": policy, "num_seeds": num_seeds, "curve": curve, "notes": notes,
            "ci": "patient bootstrap of the test set, runs averaged inside each replicate"}
