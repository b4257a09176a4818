"""Nearest-neighbour grids: Q test images, each followed by its k most cosine-similar training images, every tile
captioned with its labels and similarity, so one can judge what the features group together.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dali_pipes.shard_samples import SplitSamples
from eval.features import FeatureSet
from eval.knn import topk_cosine


def caption_labels(meta: dict, names: list[str] | None = None, limit: int = 3) -> str:
    """Short label text for a tile: positive findings ('u:' prefix for uncertain), or 'no positive label'."""
    labels = meta.get("labels") or {}
    names = names or list(labels)
    pos = [n for n in names if labels.get(n) == 1]
    unc = [f"u:{n}" for n in names if labels.get(n) == -1]
    shown = pos + unc
    text = ", ".join(shown[:limit]) + (f" +{len(shown) - limit}" if len(shown) > limit else "")
    return text or "no positive label"


def pick_queries(num_test: int, num_queries: int, seed: int) -> np.ndarray:
    """Seeded choice of ``num_queries`` distinct test rows, in ascending order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_test, size=min(num_queries, num_test), replace=False))


def neighbour_table(train: FeatureSet, test: FeatureSet, queries: np.ndarray, k: int, *, device: str = "cpu") -> dict:
    """{"queries": [test row], "indices": (Q, k) train rows, "similarity": (Q, k)} over the whole training bank."""
    nb = topk_cosine(test.features[queries], train.features, k, device=device)
    return {"queries": queries, "indices": nb.indices, "similarity": nb.similarity}


def plot_neighbours(table: dict, train_samples: SplitSamples, test_samples: SplitSamples, path: Path, *,
                    tasks: list[str] | None = None, title: str = "") -> list[dict]:
    """One row per query: the test image, then its neighbours. Returns the captions as rows for a CSV."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    queries, idx, sim = table["queries"], table["indices"], table["similarity"]
    q, k = idx.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.9 * (k + 1), 2.2 * q), squeeze=False)
    rows = []
    for r in range(q):
        tiles = [(test_samples, int(queries[r]), None)]
        tiles += [(train_samples, int(idx[r, c]), float(sim[r, c])) for c in range(k)]
        for c, (samples, i, s) in enumerate(tiles):
            ax = axes[r][c]
            meta = samples.meta(i)
            ax.imshow(samples.image(i), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            head = "query (test)" if s is None else f"#{c}  cos {s:.3f}"
            ax.set_title(f"{head}\n{caption_labels(meta, tasks)}", fontsize=6)
            if s is None:
                for spine in ax.spines.values():
                    spine.set_edgecolor("C3")
                    spine.set_linewidth(2)
            rows.append({"query": r, "rank": c, "split": samples.split, "key": samples.key(i),
                         "cosine": "" if s is None else f"{s:.6f}", "labels": caption_labels(meta, tasks, limit=99)})
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return rows
