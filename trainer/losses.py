"""Contrastive losses, reference PyTorch implementations (the fused Triton kernel must agree with these).

One general form covers SimCLR NT-Xent and its multi-positive (same patient) variant: row i's positives are the
columns with the same label, except itself; the softmax denominator is every column except itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_reference(
    z_rows: torch.Tensor,      # (R, D) L2-normalised embeddings of this rank's rows
    z_cols: torch.Tensor,      # (C, D) L2-normalised embeddings of the whole (gathered) batch
    # (R,) int64: positives share a label (sample index for SimCLR, patient for multi-positive)
    row_labels: torch.Tensor,
    col_labels: torch.Tensor,  # (C,) int64
    row_offset: int,           # column index of row 0 in z_cols (rank * R when gathered in rank order)
    temperature: float,
    reduction: str = "sum",
) -> torch.Tensor:
    """Per row: -mean_{p in P(i)} log( exp(s_ip / t) / sum_{k != i} exp(s_ik / t) ), s = cosine similarity.

    Rows without any positive contribute 0 and are not counted. ``reduction='sum'`` returns the sum over rows
    (the caller divides by the global number of rows that have a positive, so ranks add up to the global mean);
    'none' returns the per-row loss (R,); 'mean' the mean over rows with a positive.
    """
    rows = z_rows.shape[0]
    logits = (z_rows.float() @ z_cols.float().T) / temperature  # (R, C)
    self_idx = torch.arange(rows, device=z_rows.device) + row_offset
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(rows, device=z_rows.device), self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (R, C)
    pos = (row_labels[:, None] == col_labels[None, :]) & ~self_mask  # (R, C)
    num_pos = pos.sum(1)  # (R,)
    per_row = -(log_prob.masked_fill(~pos, 0.0).sum(1)) / num_pos.clamp(min=1)
    per_row = torch.where(num_pos > 0, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / (num_pos > 0).sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def simclr_labels(num_samples: int, device=None) -> torch.Tensor:
    """Labels for a batch laid out as [view1 of N samples; view2 of N samples]: (2N,) with i and i+N equal."""
    idx = torch.arange(num_samples, device=device)
    return torch.cat([idx, idx])


def nt_xent_simclr(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Single-process SimCLR NT-Xent (mean over 2N rows) for two views (N, D) each; normalises the inputs."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    labels = simclr_labels(z1.shape[0], z.device)
    return nt_xent_reference(z, z, labels, labels, 0, temperature, reduction="mean")


def moco_infonce(
    q: torch.Tensor,       # (N, D) normalised queries (gradient flows)
    k: torch.Tensor,       # (N, D) normalised keys from the momentum encoder (no gradient)
    queue: torch.Tensor,   # (K, D) normalised negative keys
    temperature: float,
) -> torch.Tensor:
    """MoCo InfoNCE: cross-entropy with the positive key at index 0 among [k_i, queue]; mean over this rank's rows."""
    q = q.float()
    pos = (q * k.float()).sum(1, keepdim=True)  # (N, 1)
    neg = q @ queue.float().T  # (N, K)
    logits = torch.cat([pos, neg], dim=1) / temperature  # (N, 1 + K)
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
