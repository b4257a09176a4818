"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018, as in DINO's kNN eval):
chunked top-k over the training bank (numpy on the CPU, torch on a GPU), per-task scores and the kNN protocol.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.bootstrap import bootstrap_ci
from eval.devices import torch_device
from eval.features import FeatureSet
from eval.labels import LabelPolicy, check_labelled, select_targets, split_counts
from eval.metrics import evaluate
from eval.protocols import add_counts, merge_ci

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
# Similarity entries held at once (query rows x bank columns): 16M float32 = 64 MiB, plus ~3x that in top-k
# temporaries, whatever the bank size (the bank itself is held once, L2-normalised).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


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
    # Candidate positions < k' are running entries, the rest are bank rows offset + (position - k').
    cand_s = np.concatenate([best_s, s], axis=1)
    kk = min(k, cand_s.shape[1])
    np.negative(cand_s, out=cand_s)
    part = np.argpartition(cand_s, kk - 1, axis=1)[:, :kk]
    part_s = -np.take_along_axis(cand_s, part, axis=1)
    order = np.argsort(-part_s, axis=1, kind="stable")
    part, part_s = np.take_along_axis(part, order, axis=1), np.take_along_axis(part_s, order, axis=1)
    prev = best_i.shape[1]
    from_best = np.take_along_axis(best_i, np.minimum(part, max(prev - 1, 0)), axis=1) if prev else part
    return part_s, np.where(part < prev, from_best, offset + part - prev)


def topk_cosine(query: np.ndarray, bank: np.ndarray, k: int, *, bank_mask: np.ndarray | None = None,
                device: str = "cpu", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Neighbours:
    """The ``k`` most cosine-similar bank rows for every query row, computed block by block so that at most
    ``chunk_elements`` similarities exist at once. ``bank_mask`` (M,) bool restricts the bank (False = excluded).
    ``device``: "cpu" (numpy) or "gpu" (torch on CUDA; "torch-cpu" runs the torch path on the CPU)."""
    mask = np.ones((1, len(bank)), dtype=bool) if bank_mask is None else np.asarray(bank_mask, dtype=bool)[None]
    return topk_cosine_masked(query, bank, k, mask, device=device, chunk_elements=chunk_elements)[0]


def topk_cosine_masked(query: np.ndarray, bank: np.ndarray, k: int, bank_masks: np.ndarray, *, device: str = "cpu",
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                       names: list[str] | None = None) -> list[Neighbours]:
    """``topk_cosine`` for several bank restrictions ``bank_masks`` (T, M) at once: each similarity block is
    computed once and shared by the T top-k searches (one per task, over the images labelled for it)."""
    bank_masks = np.asarray(bank_masks, dtype=bool)
    if k < 1:
        raise KnnError(f"k must be >= 1, got {k}")
    for t, allowed in enumerate(bank_masks):
        if k > int(allowed.sum()):
            where = f"task '{names[t]}': " if names else ""
            raise KnnError(f"{where}k = {k} is larger than the bank ({int(allowed.sum())} labelled training images)")
    # The bank is not copied normalised (at 200k x 2048 that is another 1.5 GiB): each block is divided by its norms.
    b = np.asarray(bank, dtype=np.float32)
    inv_norm = 1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", b, b)), 1e-12).astype(np.float32)   # (M,)
    q = l2_normalise(query)
    if device == "cpu":
        return _topk_numpy(q, b, inv_norm, bank_masks, k, chunk_elements)
    return _topk_torch(q, b, inv_norm, bank_masks, k, chunk_elements, torch_device(device))


def _topk_numpy(q, b, inv_norm, masks, k, chunk_elements) -> list[Neighbours]:
    rows, cols = _chunks(len(q), len(b), chunk_elements)
    out = [Neighbours(np.empty((len(q), k), dtype=np.int64), np.empty((len(q), k), dtype=np.float32)) for _ in masks]
    for r0 in range(0, len(q), rows):
        qr = q[r0 : r0 + rows]
        best = [(np.empty((len(qr), 0), dtype=np.float32), np.empty((len(qr), 0), dtype=np.int64)) for _ in masks]
        for c0 in range(0, len(b), cols):
            sim = qr @ b[c0 : c0 + cols].T                              # (rows, cols)
            sim *= inv_norm[c0 : c0 + cols]
            for t, allowed in enumerate(masks):
                block = allowed[c0 : c0 + cols]
                s = sim if block.all() else np.where(block, sim, np.float32(-np.inf))
                best[t] = _merge_topk_numpy(*best[t], s, c0, k)
        for t in range(len(masks)):
            out[t].similarity[r0 : r0 + rows], out[t].indices[r0 : r0 + rows] = best[t]
    return out


def _topk_torch(q, b, inv_norm, masks, k, chunk_elements, dev) -> list[Neighbours]:
    import torch
    rows, cols = _chunks(len(q), len(b), chunk_elements)
    bank = torch.as_tensor(b, device=dev)
    inv = torch.as_tensor(inv_norm, device=dev)
    excluded = torch.as_tensor(~masks, device=dev)                      # (T, M)
    out_s, out_i = [[] for _ in masks], [[] for _ in masks]
    with torch.no_grad():
        for r0 in range(0, len(q), rows):
            qr = torch.as_tensor(q[r0 : r0 + rows], device=dev)
            best = [(torch.empty((len(qr), 0), device=dev), torch.empty((len(qr), 0), dtype=torch.int64, device=dev))
                    for _ in masks]
            for c0 in range(0, len(b), cols):
                sim = (qr @ bank[c0 : c0 + cols].T) * inv[c0 : c0 + cols]  # (rows, cols)
                idx = torch.arange(c0, c0 + sim.shape[1], device=dev).expand_as(sim)
                for t in range(len(masks)):
                    s = sim.masked_fill(excluded[t, c0 : c0 + cols], float("-inf"))
                    cand_s, cand_i = torch.cat([best[t][0], s], 1), torch.cat([best[t][1], idx], 1)
                    top_s, pos = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1, sorted=True)
                    best[t] = (top_s, torch.gather(cand_i, 1, pos))
            for t in range(len(masks)):
                out_s[t].append(best[t][0].cpu().numpy())
                out_i[t].append(best[t][1].cpu().numpy())
    return [Neighbours(np.concatenate(i).astype(np.int64), np.concatenate(s).astype(np.float32))
            for s, i in zip(out_s, out_i)]


def knn_scores(bank: np.ndarray, bank_targets: np.ndarray, query: np.ndarray, *, k: int = DEFAULT_K,
               temperature: float = DEFAULT_TEMPERATURE, device: str = "cpu",
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, task_names: list[str] | None = None) -> np.ndarray:
    """(Q, T) scores: per task, the exp(similarity / T)-weighted mean of the labels of the k most similar bank
    images that carry a label for that task (a masked label is not a vote). ``bank_targets`` (M, T), NaN = masked."""
    if temperature <= 0:
        raise KnnError(f"temperature must be > 0, got {temperature}")
    bank_targets = np.asarray(bank_targets, dtype=np.float32)
    labelled = ~np.isnan(bank_targets).T                                 # (T, M)
    names = task_names or [f"#{j}" for j in range(bank_targets.shape[1])]
    per_task = topk_cosine_masked(query, bank, k, labelled, device=device, chunk_elements=chunk_elements, names=names)
    scores = np.empty((len(query), bank_targets.shape[1]), dtype=np.float64)
    for j, nb in enumerate(per_task):
        # Subtracting the row maximum leaves the weighted mean unchanged and keeps exp() finite for small T.
        w = np.exp((nb.similarity - nb.similarity[:, :1]).astype(np.float64) / temperature)   # (Q, k)
        scores[:, j] = (w * bank_targets[nb.indices, j]).sum(1) / w.sum(1)
    return scores


def knn_protocol(train: FeatureSet, val: FeatureSet | None, test: FeatureSet, tasks: list[str], *,
                 policy: LabelPolicy, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
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
    by_split = {"train": y_tr, "test": y_te}
    if val is not None:
        by_split["val"] = select_targets(val.labels, val.label_names, tasks, policy)
    add_counts(result, split_counts(by_split, tasks))
    result.update(protocol="knn", k=k, temperature=temperature, similarity="cosine", label_policy=policy.to_json(),
                  num_images={"train": len(train), "test": len(test)},
                  num_patients={"train": int(len(np.unique(train.pids))), "test": int(len(np.unique(test.pids)))})
    return result, {"targets": y_te, "scores": scores, "pids": test.pids}
