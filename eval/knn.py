"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018, as in DINO's kNN eval):
chunked top-k over the training bank (numpy on the CPU, torch on a GPU), per-task scores and the kNN protocol.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.bootstrap import bootstrap_ci
from eval.features import FeatureSet
from eval.labels import LabelPolicy, check_labelled, select_targets
from eval.metrics import evaluate
from eval.protocols import merge_ci

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
# Similarity entries held at once (query rows x bank columns): 64M float32 = 256 MiB, whatever the bank size.
DEFAULT_CHUNK_ELEMENTS = 1 << 26


class KnnError(ValueError):
    """kNN cannot run as asked (k larger than the bank, empty bank); one-line message."""


@dataclass
class Neighbours:
    indices: np.ndarray       # (Q, k) int64 into the bank, most similar first
    similarity: np.ndarray    # (Q, k) float32 cosine similarity


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _chunks(num_query: int, num_bank: int, chunk_elements: int) -> tuple[int, int]:
    """(query rows, bank columns) per block so that rows x columns <= chunk_elements (at least 1 x 1)."""
    bank_cols = max(1, min(num_bank, chunk_elements))
    query_rows = max(1, min(num_query, chunk_elements // bank_cols))
    return query_rows, bank_cols


def _merge_topk_numpy(best_s, best_i, s, offset, k):
    # best_*: (q, k') running top-k; s: (q, b) new block. Returns the top-k of their union, sorted descending.
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, offset + np.broadcast_to(np.arange(s.shape[1]), s.shape)], axis=1)
    kk = min(k, cand_s.shape[1])
    part = np.argpartition(-cand_s, kk - 1, axis=1)[:, :kk]
    part_s = np.take_along_axis(cand_s, part, axis=1)
    order = np.argsort(-part_s, axis=1, kind="stable")
    return np.take_along_axis(part_s, order, axis=1), np.take_along_axis(np.take_along_axis(cand_i, part, axis=1), order, axis=1)


def topk_cosine(query: np.ndarray, bank: np.ndarray, k: int, *, bank_mask: np.ndarray | None = None,
                device: str = "cpu", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Neighbours:
    """The ``k`` most cosine-similar bank rows for every query row, computed block by block so that at most
    ``chunk_elements`` similarities exist at once. ``bank_mask`` (M,) bool restricts the bank (False = excluded).
    ``device``: "cpu" (numpy) or "gpu" (torch on CUDA; "torch-cpu" runs the torch path on the CPU)."""
    q = l2_normalise(query)
    b = l2_normalise(bank)
    allowed = np.ones(len(b), dtype=bool) if bank_mask is None else np.asarray(bank_mask, dtype=bool)
    bank_size = int(allowed.sum())
    if k > bank_size:
        raise KnnError(f"k = {k} is larger than the bank ({bank_size} labelled training images)")
    if k < 1:
        raise KnnError(f"k must be >= 1, got {k}")
    if device == "cpu":
        return _topk_numpy(q, b, allowed, k, chunk_elements)
    return _topk_torch(q, b, allowed, k, chunk_elements, "cuda" if device == "gpu" else "cpu")


def _topk_numpy(q, b, allowed, k, chunk_elements) -> Neighbours:
    rows, cols = _chunks(len(q), len(b), chunk_elements)
    out_s = np.empty((len(q), k), dtype=np.float32)
    out_i = np.empty((len(q), k), dtype=np.int64)
    for r0 in range(0, len(q), rows):
        qr = q[r0 : r0 + rows]
        best_s = np.empty((len(qr), 0), dtype=np.float32)
        best_i = np.empty((len(qr), 0), dtype=np.int64)
        for c0 in range(0, len(b), cols):
            s = qr @ b[c0 : c0 + cols].T                               # (rows, cols)
            s[:, ~allowed[c0 : c0 + cols]] = -np.inf
            best_s, best_i = _merge_topk_numpy(best_s, best_i, s, c0, k)
        out_s[r0 : r0 + rows], out_i[r0 : r0 + rows] = best_s, best_i
    return Neighbours(out_i, out_s)


def _topk_torch(q, b, allowed, k, chunk_elements, torch_device) -> Neighbours:
    import torch
    dev = torch.device(torch_device)
    rows, cols = _chunks(len(q), len(b), chunk_elements)
    bank = torch.as_tensor(b, device=dev)
    mask = torch.as_tensor(~allowed, device=dev)
    out_s, out_i = [], []
    with torch.no_grad():
        for r0 in range(0, len(q), rows):
            qr = torch.as_tensor(q[r0 : r0 + rows], device=dev)
            best_s = torch.empty((len(qr), 0), device=dev)
            best_i = torch.empty((len(qr), 0), dtype=torch.int64, device=dev)
            for c0 in range(0, len(b), cols):
                s = qr @ bank[c0 : c0 + cols].T                          # (rows, cols)
                s.masked_fill_(mask[c0 : c0 + cols], float("-inf"))
                idx = torch.arange(c0, c0 + s.shape[1], device=dev).expand_as(s)
                cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
                best_s, pos = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1, sorted=True)
                best_i = torch.gather(cand_i, 1, pos)
            out_s.append(best_s.cpu().numpy())
            out_i.append(best_i.cpu().numpy())
    return Neighbours(np.concatenate(out_i).astype(np.int64), np.concatenate(out_s).astype(np.float32))


def knn_scores(bank: np.ndarray, bank_targets: np.ndarray, query: np.ndarray, *, k: int = DEFAULT_K,
               temperature: float = DEFAULT_TEMPERATURE, device: str = "cpu",
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, task_names: list[str] | None = None) -> np.ndarray:
    """(Q, T) scores: per task, the exp(similarity / T)-weighted mean of the labels of the k most similar bank
    images that carry a label for that task (a masked label is not a vote). ``bank_targets`` (M, T), NaN = masked."""
    if temperature <= 0:
        raise KnnError(f"temperature must be > 0, got {temperature}")
    bank_targets = np.asarray(bank_targets, dtype=np.float32)
    scores = np.empty((len(query), bank_targets.shape[1]), dtype=np.float64)
    for j in range(bank_targets.shape[1]):
        labelled = ~np.isnan(bank_targets[:, j])
        try:
            nb = topk_cosine(query, bank, k, bank_mask=labelled, device=device, chunk_elements=chunk_elements)
        except KnnError as e:
            name = task_names[j] if task_names else f"#{j}"
            raise KnnError(f"task '{name}': {e}") from None
        # Subtracting the row maximum leaves the weighted mean unchanged and keeps exp() finite for small T.
        w = np.exp((nb.similarity - nb.similarity[:, :1]).astype(np.float64) / temperature)   # (Q, k)
        scores[:, j] = (w * bank_targets[nb.indices, j]).sum(1) / w.sum(1)
    return scores


def split_counts(targets: np.ndarray, tasks: list[str], split: str) -> dict[str, dict[str, int]]:
    """{task: {"n_<split>_pos": .., "n_<split>_neg": ..}} of targets after the label policy (NaN = masked)."""
    return {t: {f"n_{split}_pos": int(np.sum(targets[:, j] == 1)), f"n_{split}_neg": int(np.sum(targets[:, j] == 0))}
            for j, t in enumerate(tasks)}


def add_counts(result: dict, counts: list[dict[str, dict[str, int]]]) -> None:
    for per_split in counts:
        for task, row in per_split.items():
            result["tasks"].setdefault(task, {}).update(row)


def knn_protocol(train: FeatureSet, val: FeatureSet | None, test: FeatureSet, tasks: list[str], *,
                 policy: LabelPolicy = LabelPolicy(), k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 device: str = "cpu", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, num_replicates: int = 1000,
                 seed: int = 0, source: str = "shards") -> tuple[dict, dict]:
    """Weighted kNN with the training split as the bank; test AUROC/AUPRC with patient-bootstrap CIs.
    Nothing is tuned (k and T are fixed), so val is only counted. Returns (result dict, test predictions)."""
    y_tr = select_targets(train.labels, train.label_names, tasks, policy)
    y_te = select_targets(test.labels, test.label_names, tasks, policy)
    check_labelled(y_tr, tasks, "train", source)
    check_labelled(y_te, tasks, "test", source)
    scores = knn_scores(train.features, y_tr, test.features, k=k, temperature=temperature, device=device,
                        chunk_elements=chunk_elements, task_names=tasks)
    result = merge_ci(evaluate(y_te, scores, tasks).to_dict(),
                      bootstrap_ci(y_te, scores, test.pids, tasks, num_replicates=num_replicates, seed=seed))
    counts = [split_counts(y_tr, tasks, "train")]
    if val is not None:
        counts.append(split_counts(select_targets(val.labels, val.label_names, tasks, policy), tasks, "val"))
    add_counts(result, counts)
    result.update(protocol="knn", k=k, temperature=temperature, similarity="cosine", label_policy=policy.to_json(),
                  num_images={"train": len(train), "test": len(test)},
                  num_patients={"train": int(len(np.unique(train.pids))), "test": int(len(np.unique(test.pids)))})
    return result, {"targets": y_te, "scores": scores, "pids": test.pids}
