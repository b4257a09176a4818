"""Patient-level bootstrap: 95% CIs of per-task AUROC / AUPRC and of the mean AUROC, and the paired
bootstrap of the AUROC difference between two encoders scored on the same test samples.

Images of one patient are correlated, so patients (not images) are resampled; each replicate becomes a
per-sample weight (the patient's draw count) and all replicates are scored in one vectorised pass.
"""
from __future__ import annotations

import math

import numpy as np

from eval.metrics import weighted_auroc_auprc

# Replicates drawn per generator call; fixed so a seed gives the same draws whatever B or N.
_DRAW_CHUNK = 64


def patient_weights(pids: np.ndarray, num_replicates: int, seed: int) -> np.ndarray:
    """(B, N) float64 sample weights: replicate b draws P patients with replacement; a sample's weight is
    the number of times its patient was drawn. Deterministic for ``seed``."""
    _, patient_of_sample = np.unique(np.asarray(pids), return_inverse=True)
    num_patients = int(patient_of_sample.max()) + 1 if patient_of_sample.size else 0
    rng = np.random.default_rng(seed)
    counts = np.empty((num_replicates, num_patients), dtype=np.float64)
    for start in range(0, num_replicates, _DRAW_CHUNK):
        b = min(_DRAW_CHUNK, num_replicates - start)
        draws = rng.integers(0, num_patients, size=(b, num_patients))
        flat = draws + num_patients * np.arange(b)[:, None]
        counts[start : start + b] = np.bincount(flat.ravel(), minlength=b * num_patients).reshape(b, num_patients)
    return counts[:, patient_of_sample]


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite ``values`` (NaN, NaN when none are finite)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _replicate_metrics(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) AUROC and AUPRC per replicate and task; NaN where a replicate's task has one class."""
    num_tasks = targets.shape[1]
    au = np.full((weights.shape[0], num_tasks), np.nan)
    ap = np.full_like(au, np.nan)
    for j in range(num_tasks):
        keep = ~np.isnan(targets[:, j])
        if keep.sum() == 0 or not np.isfinite(scores[keep, j]).all():
            continue
        au[:, j], ap[:, j] = weighted_auroc_auprc(targets[keep, j] > 0.5, scores[keep, j], weights[:, keep])
    return au, ap


def _mean_over_tasks(values: np.ndarray, evaluated: np.ndarray) -> np.ndarray:
    # A replicate missing any evaluated task is dropped (NaN), not averaged over fewer tasks, which would bias it.
    sub = values[:, evaluated]
    return np.where(np.isfinite(sub).all(axis=1), sub.mean(axis=1) if sub.size else np.nan, np.nan)


def bootstrap_ci(targets: np.ndarray, scores: np.ndarray, pids: np.ndarray, task_names: list[str], *,
                 num_replicates: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Patient-bootstrap CIs: ``{"tasks": {name: {"auroc_ci": [lo, hi], "auprc_ci": [...]}}, "mean_auroc_ci": [...],
    "num_replicates": B, "num_degenerate": n}`` for ``targets`` (N, T) (NaN masked), ``scores`` (N, T),
    ``pids`` (N,)."""
    targets, scores = np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    weights = patient_weights(pids, num_replicates, seed)
    au, ap = _replicate_metrics(targets, scores, weights)
    evaluated = np.array([_two_classes(targets[:, j]) and np.isfinite(scores[:, j]).all()
                          for j in range(targets.shape[1])], dtype=bool)
    mean = _mean_over_tasks(au, evaluated)
    tasks = {}
    for j, name in enumerate(task_names):
        if evaluated[j]:
            tasks[name] = {"auroc_ci": _none(percentile_ci(au[:, j], level)),
                           "auprc_ci": _none(percentile_ci(ap[:, j], level)),
                           "num_degenerate": int(np.sum(~np.isfinite(au[:, j])))}
    return {"tasks": tasks, "mean_auroc_ci": _none(percentile_ci(mean, level)), "num_replicates": num_replicates,
            "num_degenerate": int(np.sum(~np.isfinite(mean))), "seed": seed, "level": level, "unit": "patient"}


def paired_bootstrap(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, pids: np.ndarray,
                     task_names: list[str], *, num_replicates: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AUROC(a) - AUROC(b) per task and for the mean, with the same patient resamples for both encoders.

    p-value: two-sided bootstrap p = 2 * min(P(diff <= 0), P(diff >= 0)) over replicates, floored at 1/B.
    """
    targets = np.asarray(targets, dtype=np.float64)
    scores_a, scores_b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if scores_a.shape != scores_b.shape or scores_a.shape != targets.shape:
        raise ValueError(f"paired comparison needs the same test samples: targets {targets.shape}, "
                         f"a {scores_a.shape}, b {scores_b.shape}")
    evaluated = np.array([_two_classes(targets[:, j]) and np.isfinite(scores_a[:, j]).all()
                          and np.isfinite(scores_b[:, j]).all()
                          for j in range(targets.shape[1])], dtype=bool)
    point_a, _ = _replicate_metrics(targets, scores_a, np.ones((1, targets.shape[0])))
    point_b, _ = _replicate_metrics(targets, scores_b, np.ones((1, targets.shape[0])))
    weights = patient_weights(pids, num_replicates, seed)
    au_a, _ = _replicate_metrics(targets, scores_a, weights)
    au_b, _ = _replicate_metrics(targets, scores_b, weights)
    diff = au_a - au_b  # (B, T)
    out = {"tasks": {}, "num_replicates": num_replicates, "seed": seed, "level": level, "unit": "patient"}
    for j, name in enumerate(task_names):
        if evaluated[j]:
            out["tasks"][name] = _diff_summary(point_a[0, j] - point_b[0, j], diff[:, j], level)
    point_mean = float(np.mean(point_a[0, evaluated] - point_b[0, evaluated])) if evaluated.any() else float("nan")
    out["mean_auroc"] = _diff_summary(point_mean,
                                      _mean_over_tasks(au_a, evaluated) - _mean_over_tasks(au_b, evaluated), level)
    return out


def _diff_summary(point: float, replicates: np.ndarray, level: float) -> dict:
    r = replicates[np.isfinite(replicates)]
    if r.size == 0:
        return {"diff": _none1(point), "ci": [None, None], "p_value": None}
    p = 2 * min(np.mean(r <= 0), np.mean(r >= 0))
    return {"diff": _none1(point), "ci": _none(percentile_ci(r, level)),
            "p_value": float(min(1.0, max(p, 1.0 / r.size)))}


def _two_classes(y: np.ndarray) -> bool:
    y = y[~np.isnan(y)]
    return bool((y > 0.5).any() and (y <= 0.5).any())


def _none1(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _none(pair: tuple[float, float]) -> list[float | None]:
    return [_none1(pair[0]), _none1(pair[1])]


def bootstrap_mean_over_runs(targets: np.ndarray, runs_scores: list[np.ndarray], pids: np.ndarray, *,
                             num_replicates: int = 1000, seed: int = 0, level: float = 0.95) -> list[float | None]:
    """CI of the mean AUROC averaged over several runs (e.g. sampling seeds) scored on the same test set:
    every run is scored on the same patient resample, then the runs are averaged inside each replicate."""
    targets = np.asarray(targets, dtype=np.float64)
    evaluated = np.array([_two_classes(targets[:, j])
                          and all(np.isfinite(np.asarray(s)[:, j]).all() for s in runs_scores)
                          for j in range(targets.shape[1])], dtype=bool)
    weights = patient_weights(pids, num_replicates, seed)
    per_run = []
    for scores in runs_scores:
        au, _ = _replicate_metrics(targets, np.asarray(scores, dtype=np.float64), weights)
        per_run.append(_mean_over_tasks(au, evaluated))
    return _none(percentile_ci(np.mean(per_run, axis=0), level))
