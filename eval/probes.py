"""Linear probes on frozen features: one scikit-learn logistic regression per task on standardised features,
the inverse regularisation C picked on the validation split by grid search (validation AUROC).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from eval.devices import torch_device
from eval.metrics import auroc

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))  # 1e-4 ... 1e2
# Up to this many feature values (N * D) a probe's L-BFGS fit runs its BLAS on one thread: each iteration is one
# matrix-vector product, and waking BLAS threads for it costs more than it saves (a 2,310 x 512 fit was ~14x
# slower on 2 threads than on 1; even 60,000 x 2,048 was slower). Larger sets keep the library's thread count.
SINGLE_THREAD_FIT_ELEMENTS = 1 << 26


@dataclass
class ProbeResult:
    test_scores: np.ndarray                 # (N_test, T) probabilities; NaN columns for untrained tasks
    chosen_c: dict[str, float | None] = field(default_factory=dict)
    val_auroc: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # What an exported bundle needs: the chosen probe per task and the standardisation it was fitted on.
    weights: dict[str, "LinearProbe"] = field(default_factory=dict)
    feature_mean: np.ndarray | None = None  # (D,)
    feature_std: np.ndarray | None = None   # (D,)
    val_scores: np.ndarray | None = None    # (N_val, T) the chosen probes' validation probabilities


@dataclass
class LinearProbe:
    """P(y = 1 | z) = sigmoid(z @ weight + bias) on standardised features z."""
    weight: np.ndarray  # (D,)
    bias: float

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(np.asarray(z, dtype=np.float64) @ self.weight + self.bias)))


def standardise(train: np.ndarray, *others: np.ndarray, scale_from: np.ndarray | None = None) -> list[np.ndarray]:
    # Scale fitted on training images only (``scale_from``: all of the training split, labels unused; default the
    # probe's own training rows): nothing about val/test leaks into the probe.
    mean, std = feature_scale(train if scale_from is None else scale_from)
    return [((x - mean) / std).astype(np.float64) for x in (train, *others)]


def feature_scale(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (D,) of ``ref`` (N, D), accumulated in float64; a constant feature (dead ReLU)
    gets std 1 so it stays 0 instead of dividing by zero."""
    n, chunk_rows = ref.shape[0], 16384  # bounded temporaries on a 200k x 2048 split
    mean = ref.mean(axis=0, dtype=np.float64)
    sq = np.zeros(ref.shape[1], dtype=np.float64)
    for i in range(0, n, chunk_rows):
        sq += np.sum((ref[i : i + chunk_rows].astype(np.float64) - mean) ** 2, axis=0)
    std = np.sqrt(sq / max(n, 1))
    std[std < 1e-8] = 1.0
    return mean, std


def blas_threads_for_fit(x: np.ndarray):
    """A context that holds BLAS to one thread while a probe is fitted on ``x`` (N, D), if x is small enough that
    threading only adds overhead (SINGLE_THREAD_FIT_ELEMENTS); a no-op for larger sets."""
    if x.size > SINGLE_THREAD_FIT_ELEMENTS:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency
    return threadpool_limits(limits=1, user_api="blas")


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int, max_iter: int):
    """scikit-learn's L2 logistic regression (lbfgs) -> LinearProbe (its predict_proba for two classes)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(), blas_threads_for_fit(x):
        # Strong-C fits on separable tiny sets hit max_iter; the grid then simply prefers another C.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return LinearProbe(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]))


def _fit_torch(x: np.ndarray, y: np.ndarray, c: float, seed: int, max_iter: int, device: str = "cpu"):
    """The same objective as scikit-learn's (C * sum of log-losses + ||w||^2 / 2, intercept unpenalised), solved
    by full-batch L-BFGS in torch: on a GPU this keeps probes on 100k x 2048 feature sets to seconds."""
    import torch
    dev = torch_device(device)
    dtype = torch.float32 if dev.type == "cuda" else torch.float64
    xt = torch.as_tensor(x, dtype=dtype, device=dev)
    yt = torch.as_tensor(y, dtype=dtype, device=dev)
    w = torch.zeros(x.shape[1], dtype=dtype, device=dev, requires_grad=True)
    b = torch.zeros((), dtype=dtype, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = c * torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, reduction="sum") + 0.5 * (w @ w)
        loss.backward()
        return loss
    opt.step(closure)
    w_np, b_np = w.detach().cpu().numpy().astype(np.float64), float(b.detach().cpu())
    return LinearProbe(w_np, b_np)


def fit_linear_probes(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, task_names: list[str], *,
                      val_x: np.ndarray | None = None, val_y: np.ndarray | None = None,
                      c_grid: tuple[float, ...] = DEFAULT_C_GRID, fixed_c: float | None = None,
                      seed: int = 0, max_iter: int = 1000, backend: str = "sklearn", device: str = "cpu",
                      prescaled: bool = False) -> ProbeResult:
    """Train one probe per task on (``train_x`` (N, D), ``train_y`` (N, T) with NaN masked) and score ``test_x``.

    C: ``fixed_c`` if given, else the grid value with the best validation AUROC (ties: the smaller C, i.e.
    stronger regularisation); the chosen probe is the one fitted on the training split.
    ``backend``: "sklearn" (lbfgs, CPU) or "torch" (same objective, L-BFGS on ``device`` "cpu" | "gpu").
    ``prescaled``: the inputs are already standardised (k-shot probes standardise with the whole unlabelled
    training split once, as 2k examples give a noisy scale); otherwise the scale comes from ``train_x``.
    """
    if backend not in ("sklearn", "torch"):
        raise ValueError(f"unknown probe backend '{backend}' (choose sklearn or torch)")

    def fit(x, y, c):
        return _fit(x, y, c, seed, max_iter) if backend == "sklearn" else _fit_torch(x, y, c, seed, max_iter, device)
    if fixed_c is None and (val_x is None or val_y is None):
        raise ValueError("choosing C needs a validation split (val_x, val_y) or a fixed_c")
    has_val = val_x is not None
    inputs = [train_x, test_x] + ([val_x] if has_val else [])
    scaled = [np.asarray(x, dtype=np.float64) for x in inputs] if prescaled else standardise(*inputs)
    tr, te, va = scaled if has_val else (*scaled, None)
    scores = np.full((test_x.shape[0], len(task_names)), np.nan)
    result = ProbeResult(scores)
    if not prescaled:
        result.feature_mean, result.feature_std = feature_scale(train_x)
    if has_val:
        result.val_scores = np.full((val_x.shape[0], len(task_names)), np.nan)
    for j, name in enumerate(task_names):
        keep = ~np.isnan(train_y[:, j])
        y = train_y[keep, j] > 0.5
        if y.all() or not y.any():
            result.notes.append(f"{name}: not trained: training labels hold one class "
                                f"({int(y.sum())} positive of {y.size})")
            result.chosen_c[name] = None
            continue
        if fixed_c is not None:
            best_c, best_val = fixed_c, None
            best = fit(tr[keep], y, fixed_c)
        else:
            vkeep = ~np.isnan(val_y[:, j])
            best, best_c, best_val = None, None, -np.inf
            for c in sorted(c_grid):
                clf = fit(tr[keep], y, c)
                v = auroc(val_y[vkeep, j], clf(va[vkeep])) if vkeep.any() else float("nan")
                if best is None or (np.isfinite(v) and v > best_val):
                    best, best_c, best_val = clf, c, (v if np.isfinite(v) else -np.inf)
            if not np.isfinite(best_val):
                result.notes.append(f"{name}: validation split has one class; C = {best_c} (smallest in grid)")
                best_val = None
        scores[:, j] = best(te)
        result.weights[name] = best
        if has_val:
            result.val_scores[:, j] = best(va)
        result.chosen_c[name] = float(best_c)
        result.val_auroc[name] = None if best_val is None else float(best_val)
    return result
