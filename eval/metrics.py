"""Per-task AUROC / AUPRC (NaN-masked, equal to scikit-learn's), mean AUROC and accuracy.

The core works on a batch of sample-weight vectors at once, so the patient bootstrap (eval.bootstrap) is one
vectorised call instead of B Python-level metric calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Weight rows processed per chunk: bounds memory at ~ chunk x N float64 per temporary.
_MAX_CHUNK_ELEMENTS = 4_000_000


def weighted_auroc_auprc(y: np.ndarray, scores: np.ndarray,
                         weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for binary ``y`` (N,) and ``scores`` (N,) under each row of ``weights`` (B, N).

    Ties count one half (trapezoidal ROC, as sklearn.metrics.roc_auc_score); AP is sklearn's step-wise
    average_precision_score with sample_weight. A row with no positive or no negative weight gives NaN.
    Returns two (B,) arrays ((1,) when ``weights`` is None).
    """
    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if y.shape != scores.shape or y.ndim != 1:
        raise ValueError(f"y and scores must be 1-D of equal length, got {y.shape} and {scores.shape}")
    w = np.ones((1, y.size)) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if y.size == 0:
        return np.full(w.shape[0], np.nan), np.full(w.shape[0], np.nan)
    order = np.argsort(-scores, kind="mergesort")  # descending: thresholds from strict to lenient
    s_sorted, y_sorted = scores[order], y[order]
    # Index of the last sample of each group of tied scores: a ROC / PR point is emitted only there.
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, y.size))
    aurocs, aps = [], []
    for start in range(0, w.shape[0], chunk):
        ws = w[start : start + chunk][:, order]                     # (b, N)
        tp = np.cumsum(ws * y_sorted, axis=1)[:, last]              # (b, G) positive weight with score >= t
        fp = np.cumsum(ws * ~y_sorted, axis=1)[:, last]             # (b, G)
        pos, neg = tp[:, -1], fp[:, -1]                             # (b,)
        ok = (pos > 0) & (neg > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr = np.concatenate([np.zeros((len(tp), 1)), tp / pos[:, None]], axis=1)
            fpr = np.concatenate([np.zeros((len(fp), 1)), fp / neg[:, None]], axis=1)
            auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
            precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
            ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
        aurocs.append(np.where(ok, auroc, np.nan))
        aps.append(np.where(ok, ap, np.nan))
    return np.concatenate(aurocs), np.concatenate(aps)


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of one task, NaN labels masked; NaN when the masked labels hold one class only."""
    y, scores = np.asarray(y, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    keep = ~np.isnan(y)
    return float(weighted_auroc_auprc(y[keep] > 0.5, scores[keep])[0][0])


def auprc(y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve) of one task, NaN labels masked."""
    y, scores = np.asarray(y, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    keep = ~np.isnan(y)
    return float(weighted_auroc_auprc(y[keep] > 0.5, scores[keep])[1][0])


def accuracy(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction correct at ``threshold``, NaN labels masked (meaningful on balanced sets, as in k-shot)."""
    y, probs = np.asarray(y, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    keep = ~np.isnan(y)
    if not keep.any():
        return float("nan")
    return float(np.mean((probs[keep] >= threshold) == (y[keep] > 0.5)))


def balanced_accuracy(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    """Mean of sensitivity and specificity at ``threshold``, NaN labels masked; NaN when a class is absent.
    Unlike accuracy it does not reward predicting the majority class of an unbalanced test split."""
    y, probs = np.asarray(y, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    keep = ~np.isnan(y)
    pos, pred = y[keep] > 0.5, probs[keep] >= threshold
    if pos.all() or not pos.any():
        return float("nan")
    return float((np.mean(pred[pos]) + np.mean(~pred[~pos])) / 2)


@dataclass
class TaskResult:
    name: str
    n_pos: int
    n_neg: int
    auroc: float = float("nan")
    auprc: float = float("nan")
    accuracy: float | None = None
    note: str = ""

    @property
    def evaluated(self) -> bool:
        return not self.note


@dataclass
class Evaluation:
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def mean_auroc(self) -> float:
        vals = [t.auroc for t in self.tasks if t.evaluated]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def notes(self) -> list[str]:
        return [f"{t.name}: {t.note}" for t in self.tasks if t.note]

    def to_dict(self) -> dict:
        return {"mean_auroc": _finite_or_none(self.mean_auroc), "notes": self.notes,
                "tasks": {t.name: {"auroc": _finite_or_none(t.auroc), "auprc": _finite_or_none(t.auprc),
                                   "accuracy": _finite_or_none(t.accuracy), "n_pos": t.n_pos, "n_neg": t.n_neg,
                                   "note": t.note} for t in self.tasks}}


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def evaluate(targets: np.ndarray, scores: np.ndarray, task_names: list[str], *,
             with_accuracy: bool = False) -> Evaluation:
    """Per-task metrics for ``targets`` (N, T) (1 / 0 / NaN = masked) and ``scores`` (N, T) (probabilities).

    A task whose masked targets hold one class only is skipped with a note and left out of the mean AUROC.
    """
    targets, scores = np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2 or targets.shape[1] != len(task_names):
        raise ValueError(f"targets {targets.shape}, scores {scores.shape} and {len(task_names)} task names disagree")
    out = Evaluation()
    for j, name in enumerate(task_names):
        y = targets[:, j]
        keep = ~np.isnan(y)
        n_pos = int(np.sum(y[keep] > 0.5))
        n_neg = int(keep.sum()) - n_pos
        if n_pos == 0 or n_neg == 0:
            out.tasks.append(TaskResult(name, n_pos, n_neg,
                                        note=f"skipped: one class only ({n_pos} positive, {n_neg} negative)"))
            continue
        if not np.isfinite(scores[keep, j]).all():
            out.tasks.append(TaskResult(name, n_pos, n_neg, note="skipped: no scores (classifier not trained)"))
            continue
        a, p = weighted_auroc_auprc(y[keep] > 0.5, scores[keep, j])
        acc = accuracy(y, scores[:, j]) if with_accuracy else None
        out.tasks.append(TaskResult(name, n_pos, n_neg, float(a[0]), float(p[0]), acc))
    return out
