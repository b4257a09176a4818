"""Training-health metrics, accumulated on the device every step and read on the host only at log steps: embedding
std (collapse), alignment and uniformity (Wang & Isola 2020), contrastive top-1, gradient norm, LARS trust ratios,
and DINO's teacher entropy, student-teacher KL, centre norm and prototype perplexity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer import distributed as dist_utils

# Row keys, in the order of HealthMeter's accumulator; TensorBoard puts them under "health/".
EMBEDDING_KEYS = ("health/emb_std", "health/align", "health/uniform", "health/top1")
GRAD_KEYS = ("health/grad_norm",)
TRUST_KEYS = ("health/trust_min", "health/trust_median", "health/trust_max")
# DINO's own collapse signals (trainer.dino_loss.teacher_stats): uniform collapse drives the teacher entropy to log K,
# one-prototype collapse drives the prototype perplexity to 1; the KL says how far the student is from the teacher
DINO_KEYS = ("health/teacher_entropy", "health/student_teacher_kl", "health/center_norm", "health/proto_perplexity")
HEALTH_KEYS = EMBEDDING_KEYS + GRAD_KEYS + TRUST_KEYS + DINO_KEYS


def _uniformity(z: torch.Tensor) -> torch.Tensor:
    """log E_{i<j} exp(-2 ||z_i - z_j||^2) over unit vectors z (N, D); -4 is the minimum on the sphere (large D)."""
    return torch.pdist(z).pow(2).mul(-2.0).exp().mean().log()


@torch.no_grad()
def embedding_stats(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """(4,) on the device: [std, alignment, uniformity, top-1] of the two views' projections z1, z2 (N, D).

    std: per-dimension std of the L2-normalised embeddings over both views, averaged over dimensions (SimSiam's
    collapse signal: 0 when collapsed, about 1/sqrt(D) when spread). alignment: E ||z1_i - z2_i||^2 (alpha 2).
    uniformity: mean of both views' log-mean Gaussian potentials (t 2). top-1: how often a view's own partner is its
    most similar other embedding among both views of this rank's batch (2N - 1 candidates), in both directions.
    """
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    z = torch.cat([z1, z2])  # (2N, D)
    std = z.std(dim=0).mean()
    align = (z1 - z2).pow(2).sum(dim=1).mean()
    uniform = 0.5 * (_uniformity(z1) + _uniformity(z2))
    sim = z @ z.T  # (2N, 2N)
    sim.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
    top1 = (sim.argmax(dim=1) == partner).float().mean()
    return torch.stack([std, align, uniform, top1])


def grad_norm(parameters) -> torch.Tensor:
    """Global L2 norm of the gradients (a device scalar; no host read)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class HealthMeter:
    """Sums of the health values since the last ``summary``; counts are host integers, so no step reads the device."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(HEALTH_KEYS), device=device)
        self.counts = [0] * len(HEALTH_KEYS)

    def _add(self, start: int, values: torch.Tensor) -> None:
        self.sums[start:start + values.numel()] += values.detach().float().to(self.sums.device)
        for i in range(start, start + values.numel()):
            self.counts[i] += 1

    def add_embeddings(self, z1: torch.Tensor, z2: torch.Tensor) -> None:
        self._add(0, embedding_stats(z1.detach(), z2.detach()))

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        self._add(len(EMBEDDING_KEYS), norm.reshape(1))

    def add_trust_ratios(self, trust: torch.Tensor) -> None:
        """``trust`` (P,): one LARS step's per-tensor ratios eta * ||p|| / ||g||."""
        t = trust.detach().float()
        self._add(len(EMBEDDING_KEYS) + len(GRAD_KEYS), torch.stack([t.min(), t.median(), t.max()]))

    def add_dino(self, values: torch.Tensor) -> None:
        """``values`` (4,): one DINO step's teacher entropy, student-teacher KL, centre norm, prototype perplexity."""
        self._add(len(EMBEDDING_KEYS) + len(GRAD_KEYS) + len(TRUST_KEYS), values.reshape(len(DINO_KEYS)))

    def summary(self) -> dict:
        """Means over the steps since the last call, averaged over ranks (one host read; a collective with several
        ranks, so every rank must call it at the same step). Keys never fed (e.g. trust without LARS) are left out."""
        counts = torch.tensor([max(c, 1) for c in self.counts], dtype=torch.float32, device=self.sums.device)
        values = dist_utils.all_reduce_mean(self.sums / counts).tolist()
        row = {k: v for k, v, c in zip(HEALTH_KEYS, values, self.counts) if c > 0}
        self.sums.zero_()
        self.counts = [0] * len(HEALTH_KEYS)
        return row


def collapse_warning(row: dict, proj_dim: int, ratio: float) -> str | None:
    """A one-line warning when the embedding std falls under ``ratio / sqrt(proj_dim)``, else None."""
    std = row.get("health/emb_std")
    if std is None or ratio <= 0 or not math.isfinite(std):
        return None
    threshold = ratio / math.sqrt(proj_dim)
    if std >= threshold:
        return None
    return (f"warning: step {row['step']}: embedding std {std:.4f} < {threshold:.4f} ({ratio} / sqrt({proj_dim})): "
            f"the representations may be collapsing (healthy is near {1 / math.sqrt(proj_dim):.4f})")
