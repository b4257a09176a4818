"""Label-scarce training sets: nested patient-level label fractions and k-shot (k positives + k negatives)
draws with balanced test sets, all seeded.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_FRACTIONS = (0.001, 0.01, 0.1, 1.0)


def fraction_subsets(pids: np.ndarray, fractions: tuple[float, ...] = DEFAULT_FRACTIONS, seed: int = 0) -> dict[float, np.ndarray]:
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
