"""Distribution-shift transfer: linear probes fitted and selected on the source shards, scored without refitting
on the source's test split and on target shards (another dataset); label names matched across CheXpert / MIMIC / NIH.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.bootstrap import bootstrap_ci, patient_weights, percentile_ci
from eval.features import FeatureSet
from eval.labels import LabelPolicy, TaskError, check_labelled, select_targets, split_counts
from eval.metrics import evaluate, weighted_auroc_auprc
from eval.probes import DEFAULT_C_GRID, fit_linear_probes
from eval.protocols import add_counts, merge_ci

# Names that denote the same finding in different label sets. CheXpert and MIMIC-CXR share CheXpert's 14 names;
# NIH ChestX-ray14 spells two differently. Findings without an equivalent (CheXpert's Lung Opacity, NIH's
# Infiltration, ...) are not matched: a near-synonym would silently change what the shifted AUROC measures.
SYNONYMS: tuple[frozenset[str], ...] = (
    frozenset({"Pleural Effusion", "Effusion"}),
    frozenset({"Pleural_Thickening", "Pleural Thickening"}),
)


def parse_task_map(items: list[str]) -> dict[str, str]:
    """``--task-map SRC=DST`` items -> {src: dst}; TaskError on a malformed item."""
    out = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise TaskError(f"--task-map '{item}': expected SOURCE_NAME=TARGET_NAME")
        out[src.strip()] = dst.strip()
    return out


def _builtin_match(name: str, target_names: list[str]) -> str | None:
    if name in target_names:
        return name
    for group in SYNONYMS:
        if name in group:
            hits = [t for t in target_names if t in group]
            if hits:
                return hits[0]
    return None


def map_tasks(tasks: list[str], explicit: bool, source_names: list[str], target_names: list[str],
              overrides: dict[str, str], *, source: str, target: str) -> tuple[dict[str, str], list[str]]:
    """({source task: target label}, notes). ``explicit``: the tasks were named by the user, so each must map;
    otherwise unmapped tasks are left out with a note. TaskError (one line) for a map naming a missing label,
    an unmapped named task, or target shards with no mapped task at all."""
    for src, dst in overrides.items():
        if src not in source_names:
            raise TaskError(f"--task-map '{src}={dst}': '{src}' is not a label of {source} ({', '.join(source_names)})")
        if dst not in target_names:
            raise TaskError(f"--task-map '{src}={dst}': '{dst}' is not a label of {target} ({', '.join(target_names)})")
    mapping, notes = {}, []
    for t in tasks:
        dst = overrides.get(t) or _builtin_match(t, target_names)
        if dst is not None:
            mapping[t] = dst
        elif explicit:
            raise TaskError(f"task '{t}' has no counterpart in {target} ({', '.join(target_names)}); "
                            f"add --task-map '{t}=TARGET_NAME'")
        else:
            notes.append(f"{t}: not evaluated: no counterpart among the target's labels")
    if not mapping:
        raise TaskError(f"{target}: no task of {source} maps to a target label ({', '.join(target_names)}); "
                        f"give --task-map SOURCE_NAME=TARGET_NAME")
    return mapping, notes


def concat_features(parts: list[FeatureSet]) -> FeatureSet:
    """One FeatureSet of several splits of the same shards (patient ids share one table)."""
    return FeatureSet(np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts]),
                      np.concatenate([p.pids for p in parts]), parts[0].label_names)


def _replicate_auroc(targets: np.ndarray, scores: np.ndarray, pids: np.ndarray, num_replicates: int,
                     seed: int) -> np.ndarray:
    """(B, T) patient-bootstrap replicates of per-task AUROC (NaN where a replicate has one class)."""
    weights = patient_weights(pids, num_replicates, seed)
    out = np.full((num_replicates, targets.shape[1]), np.nan)
    for j in range(targets.shape[1]):
        keep = ~np.isnan(targets[:, j])
        if keep.any() and np.isfinite(scores[keep, j]).all():
            out[:, j] = weighted_auroc_auprc(targets[keep, j] > 0.5, scores[keep, j], weights[:, keep])[0]
    return out


def drop_summary(in_domain: dict, shifted: dict, y_in, s_in, pid_in, y_sh, s_sh, pid_sh, tasks: list[str], *,
                 num_replicates: int, seed: int) -> dict:
    """AUROC(in-domain) - AUROC(shifted) per task and for the mean over tasks evaluated in both, with a 95% CI
    from independent patient bootstraps of the two (disjoint) test sets."""
    rep_in = _replicate_auroc(y_in, s_in, pid_in, num_replicates, seed)
    rep_sh = _replicate_auroc(y_sh, s_sh, pid_sh, num_replicates, seed + 1)  # other draws: the sets are independent
    point_in = {t: in_domain["tasks"][t]["auroc"] for t in tasks}
    point_sh = {t: shifted["tasks"][t]["auroc"] for t in tasks}
    both = [j for j, t in enumerate(tasks) if point_in[t] is not None and point_sh[t] is not None]
    out = {"tasks": {}}
    for j in both:
        t = tasks[j]
        lo, hi = percentile_ci(rep_in[:, j] - rep_sh[:, j])
        out["tasks"][t] = {"drop": point_in[t] - point_sh[t], "drop_ci": _ci(lo, hi)}
    if both:
        d = rep_in[:, both].mean(1) - rep_sh[:, both].mean(1)  # NaN when any task is degenerate in a replicate
        point = float(np.mean([out["tasks"][tasks[j]]["drop"] for j in both]))
        out["mean"] = {"drop": point, "drop_ci": _ci(*percentile_ci(d)), "tasks": [tasks[j] for j in both]}
    else:
        out["mean"] = {"drop": None, "drop_ci": [None, None], "tasks": []}
    return out


def _ci(lo: float, hi: float) -> list[float | None]:
    return [float(lo) if np.isfinite(lo) else None, float(hi) if np.isfinite(hi) else None]


@dataclass
class Scored:
    """One evaluated set: raw labels (N, L) in ``label_names`` order, patient ids and the model's scores (N, T)."""
    labels: np.ndarray
    label_names: list[str]
    pids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.pids)


def score_shift(src: Scored, tgt: Scored, mapping: dict[str, str], *, policy: LabelPolicy, num_replicates: int,
                seed: int, target_name: str) -> tuple[dict, dict, dict]:
    """In-domain and shifted AUROC with CIs and the drop, for scores made by one unchanged model on both sets.
    Returns (result, in-domain predictions, shifted predictions); task columns in ``mapping`` order."""
    tasks = list(mapping)
    y_in = select_targets(src.labels, src.label_names, tasks, policy)
    y_sh = select_targets(tgt.labels, tgt.label_names, [mapping[t] for t in tasks], policy)
    check_labelled(y_sh, [mapping[t] for t in tasks], "evaluated", target_name)
    in_domain = merge_ci(evaluate(y_in, src.scores, tasks).to_dict(),
                         bootstrap_ci(y_in, src.scores, src.pids, tasks, num_replicates=num_replicates, seed=seed))
    shifted = merge_ci(evaluate(y_sh, tgt.scores, tasks).to_dict(),
                       bootstrap_ci(y_sh, tgt.scores, tgt.pids, tasks, num_replicates=num_replicates, seed=seed))
    add_counts(in_domain, split_counts({"test": y_in}, tasks))
    add_counts(shifted, split_counts({"target": y_sh}, tasks))
    for t in tasks:
        shifted["tasks"][t]["target_label"] = mapping[t]
    drop = drop_summary(in_domain, shifted, y_in, src.scores, src.pids, y_sh, tgt.scores, tgt.pids, tasks,
                        num_replicates=num_replicates, seed=seed)
    result = {"protocol": "transfer", "task_map": dict(mapping), "label_policy": policy.to_json(),
              "in_domain": in_domain, "shifted": shifted, "drop": drop, "notes": [],
              "num_images": {"test": len(src), "target": len(tgt)},
              "num_patients": {"test": int(len(np.unique(src.pids))), "target": int(len(np.unique(tgt.pids)))}}
    return (result, {"targets": y_in, "scores": src.scores, "pids": src.pids},
            {"targets": y_sh, "scores": tgt.scores, "pids": tgt.pids})


def transfer_protocol(train: FeatureSet, val: FeatureSet, src_test: FeatureSet, target: FeatureSet,
                      mapping: dict[str, str], *, policy: LabelPolicy, c_grid=DEFAULT_C_GRID,
                      num_replicates: int = 1000, seed: int = 0, source: str = "source", target_name: str = "target",
                      probe: dict | None = None) -> tuple[dict, dict, dict]:
    """Probes fitted on ``train`` with C chosen on ``val`` (all source), then scored unchanged on ``src_test`` and
    on ``target``. Returns (result, in-domain predictions, shifted predictions); task columns in ``mapping`` order."""
    tasks = list(mapping)
    y_tr = select_targets(train.labels, train.label_names, tasks, policy)
    y_va = select_targets(val.labels, val.label_names, tasks, policy)
    check_labelled(y_tr, tasks, "train", source)
    fitted = fit_linear_probes(train.features, y_tr, np.concatenate([src_test.features, target.features]), tasks,
                               val_x=val.features, val_y=y_va, c_grid=c_grid, seed=seed, **(probe or {}))
    s_in, s_sh = fitted.test_scores[: len(src_test)], fitted.test_scores[len(src_test):]
    result, p_in, p_sh = score_shift(Scored(src_test.labels, src_test.label_names, src_test.pids, s_in),
                                     Scored(target.labels, target.label_names, target.pids, s_sh), mapping,
                                     policy=policy, num_replicates=num_replicates, seed=seed, target_name=target_name)
    add_counts(result["in_domain"], split_counts({"train": y_tr, "val": y_va}, tasks))
    result.update(probe="linear", chosen_c=fitted.chosen_c, val_auroc=fitted.val_auroc, notes=list(fitted.notes))
    result["num_images"].update(train=len(train), val=len(val))
    return result, p_in, p_sh
