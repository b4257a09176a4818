"""Online kNN monitor: the frozen backbone embeds a fixed labelled val subset (decoded once, kept on the device) and a
two-fold, patient-split weighted kNN scores per-task AUROC, so a long run shows whether its representation improves.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ingest.errors import one_line
from trainer.data import local_shards
# Weighted kNN of Wu et al. 2018, as in the solo-learn / lightly online monitors: cosine similarity, weights
# exp(sim / 0.07).
KNN_TEMPERATURE = 0.07
QUERY_CHUNK = 1024  # query rows per similarity block: bounds the (chunk, M) matrix for large subsets


class MonitorUnavailable(Exception):
    """Why this run has no monitor (no val split, no labels, ...); one line, printed by the trainer."""


def label_targets(raw: np.ndarray) -> np.ndarray:
    """Raw shard labels (1 / 0 / -1 / NaN) -> targets: blank (NaN) = 0, uncertain (-1) masked (NaN). The defaults
    of eval.labels.LabelPolicy (blank zero, u-ignore), re-stated here because trainer sits left of eval."""
    raw = np.asarray(raw, dtype=np.float32)
    out = np.where(np.isnan(raw), 0.0, raw).astype(np.float32)
    out[raw == -1] = np.nan
    return out


@dataclass
class MonitorSet:
    """The cached subset: normalised images on the device, targets (M, T) with NaN = masked, patient ids (M,)."""
    images: torch.Tensor    # (M, C, H, W), channels-last, the run's input dtype
    targets: np.ndarray     # (M, T) float32
    pids: np.ndarray        # (M,) int64
    task_names: list[str]
    decode_s: float
    folds: np.ndarray = field(init=False)  # (M,) int64 in {0, 1}: patient_folds(pids)

    def __post_init__(self):
        self.folds = patient_folds(self.pids)


def load_monitor_set(shards: str, split: str, *, max_images: int, image_size: int, channels: int, dtype: torch.dtype,
                     device: torch.device, dali_device: str, num_threads: int, batch_size: int) -> MonitorSet:
    """Decode the first ``max_images`` samples of ``split`` (ingest shuffles across patients, so a random subset)
    with the eval graph (resize to image_size * 8/7, centre crop, as `python -m eval` does)."""
    from dali_pipes import build_eval_loader
    from ingest.schema import ShardFormatError, load_manifest

    t0 = time.perf_counter()
    try:
        manifest = load_manifest(shards)
        if not manifest.label_names:
            raise MonitorUnavailable(f"{shards}: the shards carry no labels")
        if manifest.num_samples(split) == 0:
            raise MonitorUnavailable(f"{shards}: split '{split}' has no samples")
    except (ShardFormatError, OSError) as e:
        raise MonitorUnavailable(one_line(e)) from None
    loader = build_eval_loader(shards, split, batch_size=batch_size, device=dali_device, image_size=image_size,
                               resize_size=int(round(image_size * 8 / 7)), channels=channels, dtype=dtype,
                               num_threads=num_threads, device_id=device.index if dali_device == "gpu" else None)
    images, labels, pids, count = [], [], [], 0
    for batch in loader:
        keep = batch["valid"].cpu()
        take = int(min(int(keep.sum()), max_images - count))
        images.append(batch["images"][:take].to(device))  # may view DALI's buffer (kept safely); cat() copies
        labels.append(batch["labels"][:take].float().cpu().numpy())
        pids.append(batch["pids"][:take].cpu().numpy())
        count += take
        if count >= max_images:
            break
    targets = label_targets(np.concatenate(labels))
    data = MonitorSet(images=torch.cat(images).contiguous(memory_format=torch.channels_last), targets=targets,
                      pids=np.concatenate(pids).astype(np.int64), task_names=list(manifest.label_names),
                      decode_s=time.perf_counter() - t0)
    if not (data.folds == 0).any() or not (data.folds == 1).any():
        raise MonitorUnavailable(f"{shards}: the first {count} images of split '{split}' come from too few patients "
                                 "to split them into two folds")
    if not scored_tasks(targets, data.folds):
        raise MonitorUnavailable(f"{shards}: no label of split '{split}' has both classes within one patient fold "
                                 f"of its first {count} images")
    return data


def _both_classes(y: np.ndarray) -> bool:
    y = y[~np.isnan(y)]
    return bool((y == 1).any() and (y == 0).any())


def patient_folds(pids: np.ndarray) -> np.ndarray:
    """(M,) int64 in {0, 1}: each image's fold, the top bit of a 64-bit mix (splitmix64's finaliser) of its patient
    id, so a patient's images share one fold whatever the ids look like (sequential, hashed, all even)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        z = np.asarray(pids).astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(63)).astype(np.int64)


@torch.no_grad()
def knn_scores(query: torch.Tensor, bank: torch.Tensor, bank_targets: torch.Tensor, k: int,
               temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Weighted kNN: each query's score per task is the exp(sim / T)-weighted mean label of its k most cosine-similar
    bank images whose label for that task is not masked. query (Q, F), bank (B, F), bank_targets (B, T) with NaN
    masked -> (Q, T), NaN where no neighbour has that label."""
    q, b = F.normalize(query.float(), dim=1), F.normalize(bank.float(), dim=1)
    valid = ~torch.isnan(bank_targets)  # (B, T)
    y = torch.nan_to_num(bank_targets, nan=0.0)
    k = min(k, b.shape[0])
    out = []
    for a in range(0, q.shape[0], QUERY_CHUNK):
        top, idx = (q[a:a + QUERY_CHUNK] @ b.T).topk(k, dim=1)  # (q, k)
        wv = torch.exp(top / temperature)[:, :, None] * valid[idx]  # (q, k, T)
        out.append((wv * y[idx]).sum(1) / wv.sum(1))
    return torch.cat(out)


def cross_fold_scores(features: torch.Tensor, targets: torch.Tensor, folds: torch.Tensor, k: int) -> torch.Tensor:
    """Each image scored by kNN against the OTHER fold only. Folds split patients, so no image meets its own
    patient's; and unlike leave-one-out, every query of a fold sees the same bank, so within a fold the scores do
    not depend on the query's own label (leave-one-out lowers the bank's positive rate exactly for the positive
    queries, which biases a pooled AUROC below 0.5 on random features). (M, F), (M, T), (M,) -> (M, T)."""
    scores = torch.full(targets.shape, float("nan"), device=targets.device)
    for fold in (0, 1):
        query, bank = folds == fold, folds != fold
        if query.any() and bank.any():
            scores[query] = knn_scores(features[query], features[bank], targets[bank], k)
    return scores


def scored_tasks(targets: np.ndarray, folds: np.ndarray) -> list[int]:
    """Tasks with both classes within at least one fold whose other fold is not empty: those get an AUROC."""
    return [t for t in range(targets.shape[1])
            if any(_both_classes(targets[folds == f, t]) and (folds != f).any() for f in (0, 1))]


def knn_auroc(scores: np.ndarray, targets: np.ndarray, folds: np.ndarray, task_names: list[str]) -> dict[str, float]:
    """Per-task AUROC: computed within each fold (over images with a label and a score, where the fold has both
    classes), then averaged over the folds; pooling the folds would compare scores from two different banks.
    Plus the mean over tasks."""
    from sklearn.metrics import roc_auc_score

    row = {}
    for t, name in enumerate(task_names):
        per_fold = []
        for fold in (0, 1):
            ok = (folds == fold) & ~np.isnan(targets[:, t]) & ~np.isnan(scores[:, t])
            if _both_classes(targets[ok, t]):
                per_fold.append(float(roc_auc_score(targets[ok, t], scores[ok, t])))
        if per_fold:
            row[f"knn_auroc/{name}"] = float(np.mean(per_fold))
    if row:
        row["knn_auroc_mean"] = float(np.mean(list(row.values())))
    return row


class KnnMonitor:
    """Call with the backbone: eval mode for the forward (BatchNorm uses, never updates, its running statistics),
    every module's train/eval flag restored afterwards; returns {"knn_auroc/<task>", "knn_auroc_mean", "monitor_s"}."""

    def __init__(self, data: MonitorSet, *, k: int, batch_size: int, autocast=None):
        self.data, self.k, self.batch_size = data, k, batch_size
        self.autocast = autocast or contextlib.nullcontext  # zero-argument callable: the run's autocast context
        device = data.images.device
        self.targets = torch.from_numpy(data.targets).to(device)
        self.folds = torch.from_numpy(data.folds).to(device)

    @torch.no_grad()
    def embed(self, backbone: nn.Module) -> torch.Tensor:
        modes = [(m, m.training) for m in backbone.modules()]
        backbone.eval()
        try:
            feats = []
            for a in range(0, self.data.images.shape[0], self.batch_size):
                with self.autocast():
                    feats.append(backbone(self.data.images[a:a + self.batch_size]).float())
            return torch.cat(feats)  # (M, F)
        finally:
            for m, training in modes:
                m.training = training

    def __call__(self, backbone: nn.Module) -> dict:
        t0 = time.perf_counter()
        scores = cross_fold_scores(self.embed(backbone), self.targets, self.folds, self.k)
        row = knn_auroc(scores.cpu().numpy(), self.data.targets, self.data.folds, self.data.task_names)
        row["monitor_s"] = time.perf_counter() - t0
        return row


MONITOR_SPLIT = "val"


def build_monitor(cfg, device: torch.device, dtype: torch.dtype, autocast=None) -> KnnMonitor | None:
    """The run's monitor, or None after printing one line saying why there is none (off, synthetic data, a val
    split without labels, ...). Decodes the subset now, so a failure shows before the first step."""
    run = cfg.run
    if run.monitor_every == 0 or run.monitor_images == 0:
        return None
    try:
        if cfg.data.source != "shards":
            raise MonitorUnavailable(f"data.source={cfg.data.source} has no val split")
        dali_device = cfg.data.device if cfg.data.device != "auto" else ("gpu" if device.type == "cuda" else "cpu")
        data = load_monitor_set(local_shards(cfg.data), MONITOR_SPLIT, max_images=run.monitor_images,
                                image_size=cfg.data.image_size, channels=cfg.model.in_channels, dtype=dtype,
                                device=device, dali_device=dali_device, num_threads=cfg.data.num_threads,
                                batch_size=max(2, min(cfg.data.batch_size, 256)))
    except MonitorUnavailable as e:
        print(f"monitor: off ({e})", flush=True)
        return None
    folds = data.folds
    tasks = len(scored_tasks(data.targets, folds))
    print(f"monitor: kNN (k={run.monitor_k}) on {data.images.shape[0]} '{MONITOR_SPLIT}' images in two patient folds "
          f"({int((folds == 0).sum())} / {int((folds == 1).sum())}), {tasks} task(s) with both classes, every "
          f"{run.monitor_every} steps and at the end; rank 0 embeds, other ranks wait "
          f"(decoded in {data.decode_s:.1f} s)", flush=True)
    return KnnMonitor(data, k=run.monitor_k, batch_size=max(2, min(cfg.data.batch_size, 256)), autocast=autocast)
