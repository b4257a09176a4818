"""Label-scarce training sets: nested patient-level label fractions, the fraction-matched validation subset,
and k-shot (k positives + k negatives) draws, all seeded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_FRACTIONS = (0.001, 0.01, 0.1, 1.0)
DEFAULT_VAL_MIN_PER_CLASS = 5


def fraction_subsets(pids: np.ndarray, fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
                     seed: int = 0) -> dict[float, np.ndarray]:
    """Sample indices (into ``pids``) for each label fraction, sampled by patient and nested: one seeded
    permutation of the patients, fraction f keeps its first ceil(f * P) patients (at least one), so a
    smaller fraction is always inside a larger one and a patient is never split."""
    pids = np.asarray(pids)
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"label fraction must be in (0, 1], got {f}")
    patients = np.unique(pids)
    order = np.random.default_rng(seed).permutation(patients)
    out = {}
    for f in sorted(fractions):
        chosen = order[: max(1, math.ceil(f * len(patients)))]
        out[f] = np.flatnonzero(np.isin(pids, chosen))
    return out


@dataclass(frozen=True)
class ValSubset:
    """Validation images used for model selection at one label fraction."""
    indices: np.ndarray        # (M,) indices into the validation split, sorted
    num_patients: int
    matched_patients: int      # ceil(fraction * patients): the size before any enlargement
    enlarged: bool             # True when patients were added to reach the per-class minimum

    def to_json(self) -> dict:
        return {"num_images": int(len(self.indices)), "num_patients": self.num_patients,
                "matched_patients": self.matched_patients, "enlarged": self.enlarged}


def matched_val_subset(pids: np.ndarray, targets: np.ndarray, fraction: float, seed: int,
                       min_per_class: int = DEFAULT_VAL_MIN_PER_CLASS) -> ValSubset:
    """Validation images of a seeded, nested patient sample of ``fraction`` of the val patients (as
    ``fraction_subsets``), enlarged along the same patient order until every task of ``targets`` (M, T; 1 / 0 /
    NaN) has ``min_per_class`` positive and negative images, or as many as the whole split has."""
    pids, targets = np.asarray(pids), np.asarray(targets, dtype=np.float64)
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    patients = np.unique(pids)
    order = np.random.default_rng(seed).permutation(patients)
    matched = max(1, math.ceil(fraction * len(patients)))
    # (P, T) positive / negative images per patient, in sampling order; the cumulative sums give each prefix's counts.
    rank = np.empty(len(patients), dtype=np.int64)
    rank[np.searchsorted(patients, order)] = np.arange(len(patients))
    row = rank[np.searchsorted(patients, pids)]
    pos = np.zeros((len(patients), targets.shape[1]))
    neg = np.zeros_like(pos)
    np.add.at(pos, row, np.nan_to_num(targets, nan=0.0) > 0.5)
    np.add.at(neg, row, targets < 0.5)
    cum_pos, cum_neg = np.cumsum(pos, axis=0), np.cumsum(neg, axis=0)
    goal_pos = np.minimum(min_per_class, cum_pos[-1])   # (T,) a split short of the minimum counts as all it has
    goal_neg = np.minimum(min_per_class, cum_neg[-1])
    ok = np.all((cum_pos >= goal_pos) & (cum_neg >= goal_neg), axis=1)   # (P,) prefix length i + 1 suffices
    needed = int(np.argmax(ok)) + 1
    size = max(matched, needed)
    chosen = order[:size]
    return ValSubset(np.flatnonzero(np.isin(pids, chosen)), int(size), int(matched), size > matched)


def kshot_indices(targets: np.ndarray, pids: np.ndarray, k: int, seed: int) -> list[np.ndarray | None]:
    """Per task: indices of k positive and k negative training images from 2k distinct patients (a patient
    is not both a positive and a negative example), or None when the split has too few of either."""
    targets, pids = np.asarray(targets), np.asarray(pids)
    rng = np.random.default_rng(seed)
    out: list[np.ndarray | None] = []
    for j in range(targets.shape[1]):
        y = targets[:, j]
        pos = _one_per_patient(np.flatnonzero(y == 1), pids, rng)
        neg_all = np.flatnonzero(y == 0)
        if len(pos) < k:
            out.append(None)
            continue
        pos = pos[:k]
        neg_all = neg_all[~np.isin(pids[neg_all], pids[pos])]
        neg = _one_per_patient(neg_all, pids, rng)
        out.append(None if len(neg) < k else np.concatenate([pos, neg[:k]]))
    return out


def balanced_test_indices(y: np.ndarray, seed: int) -> np.ndarray:
    """All of the rarer class plus as many of the other class drawn without replacement (NaN masked)."""
    y = np.asarray(y)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n = min(len(pos), len(neg))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


def _one_per_patient(idx: np.ndarray, pids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Shuffle, then keep each patient's first image: k examples then mean k patients, not k near-duplicates.
    idx = rng.permutation(idx)
    _, first = np.unique(pids[idx], return_index=True)
    return rng.permutation(idx[np.sort(first)])


def split_patient_ids(shard_root, split: str) -> np.ndarray:
    """(N,) int64 patient index of every sample of ``split``, read from the shards' ``.pid`` members with the
    standard tar reader (no image decoding): what patient-level sampling needs before any model runs."""
    import tarfile
    from pathlib import Path

    from ingest.schema import load_manifest
    out = []
    for shard in load_manifest(Path(shard_root)).shards(split):
        with tarfile.open(shard.path) as tf:
            for member in tf:
                if member.name.endswith(".pid"):
                    out.append(np.frombuffer(tf.extractfile(member).read(), dtype="<i8")[0])
    return np.asarray(out, dtype=np.int64)
