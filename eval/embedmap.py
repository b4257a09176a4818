"""2-D maps of frozen features (PCA, or t-SNE started from PCA) coloured by a label, the view, the sex or the
dataset of each image: a PNG plus a CSV of the coordinates.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.labels import LabelPolicy, apply_policy

FIELDS = ("view", "sex", "dataset")


def embed_2d(features: np.ndarray, method: str = "pca", *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(N, 2) coordinates of L2-normalised features (cosine geometry, as kNN sees them)."""
    from sklearn.decomposition import PCA
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE
        # t-SNE needs perplexity < N; small test sets get the largest allowed value.
        perp = min(perplexity, max(1.0, (len(x) - 1) / 3))
        return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"unknown embedding method '{method}' (choose pca or tsne)")


def colour_values(metas: list[dict], raw_labels: np.ndarray, label_names: list[str], colour_by: str,
                  policy: LabelPolicy) -> list[str]:
    """Category per image: "positive" / "negative" / "masked" for a label name (label policy applied; "no such
    label" for shards without it), or the metadata field's value for view / sex / dataset."""
    if colour_by in FIELDS:
        return [str(m.get(colour_by) or "unknown") for m in metas]
    if colour_by not in label_names:
        return ["no such label"] * len(metas)
    y = apply_policy(raw_labels[:, [label_names.index(colour_by)]], policy)[:, 0]
    return ["masked" if np.isnan(v) else ("positive" if v == 1 else "negative") for v in y]


def plot_map(coords: np.ndarray, values: list[str], path: Path, *, title: str, legend_title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, cat in enumerate(sorted(set(values))):
        sel = np.array([v == cat for v in values])
        ax.scatter(coords[sel, 0], coords[sel, 1], s=8, alpha=0.7, color=f"C{i % 10}",
                   label=f"{cat} ({int(sel.sum())})")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(title=legend_title, fontsize=7, title_fontsize=8, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
