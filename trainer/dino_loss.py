"""DINO's pieces as functions: the multi-crop prototype cross-entropy (memory-bounded), teacher centering and its
all-reduced centre, Sinkhorn-Knopp teacher targets, the KoLeo regulariser, and the momentum / temperature / weight
decay schedules as pure functions of the step.

Memory of the cross-entropy at large K: the textbook form (log_softmax of every student crop, then q * log p) keeps
a (crops x B, K) log-probability tensor for backward on top of the logits and their gradient. `prototype_ce` uses
sum_k q_k log p_k = (q . s) / T - logsumexp(s / T) (q sums to 1) and an autograd function that recomputes the
softmax in row blocks in backward, so beyond the logits, their gradient and the teacher targets it holds one
(rows, K) block (bytes measured by `python -m bench dino loss-memory`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK_ROWS = 256  # rows of one softmax block: 256 x 65,536 fp32 = 64 MiB


def _pairs(n_global: int, n_crops: int) -> int:
    """(teacher global crop, student crop) pairs, a crop never paired with itself."""
    return n_global * n_crops - n_global


class _PrototypeCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, student_temp: float, *crops: torch.Tensor) -> torch.Tensor:
        # q (G, B, K) teacher targets of the global crops; crops: V tensors (B, K) of student logits, the first G the
        # same global crops in the same order
        g, b, _ = q.shape
        q_sum = q.sum(0)  # (B, K)
        total = torch.zeros((), dtype=q.dtype, device=q.device)
        for v, s in enumerate(crops):
            n_t = g - 1 if v < g else g  # teacher crops paired with this student crop
            for a in range(0, b, BLOCK_ROWS):
                x = s[a:a + BLOCK_ROWS].to(q.dtype)
                qv = q_sum[a:a + BLOCK_ROWS] - q[v, a:a + BLOCK_ROWS] if v < g else q_sum[a:a + BLOCK_ROWS]
                lse = torch.logsumexp(x / student_temp, dim=1)  # (rows,)
                total += n_t * lse.sum() - (qv * x).sum() / student_temp
        ctx.save_for_backward(q, q_sum, *crops)
        ctx.student_temp = student_temp
        return total / (b * _pairs(g, len(crops)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, q_sum, *crops = ctx.saved_tensors
        t = ctx.student_temp
        g, b, _ = q.shape
        scale = grad / (b * _pairs(g, len(crops)) * t)
        grads = []
        for v, s in enumerate(crops):
            n_t = g - 1 if v < g else g
            out = torch.empty_like(s)
            for a in range(0, b, BLOCK_ROWS):
                p = torch.softmax(s[a:a + BLOCK_ROWS].to(q.dtype) / t, dim=1)
                qv = q_sum[a:a + BLOCK_ROWS] - q[v, a:a + BLOCK_ROWS] if v < g else q_sum[a:a + BLOCK_ROWS]
                out[a:a + BLOCK_ROWS] = ((n_t * p - qv) * scale).to(s.dtype)
            grads.append(out)
        return (None, None, *grads)


def prototype_ce(student: list[torch.Tensor], q: torch.Tensor, student_temp: float) -> torch.Tensor:
    """DINO's loss: mean over (teacher global crop g, student crop v != g) pairs and samples of
    -sum_k q_g[k] log softmax(s_v / student_temp)[k]. student: V >= 2 tensors (B, K) of logits, global crops first
    in q's order; q (G, B, K) teacher probabilities (no gradient). Computed in fp32 (fp64 for fp64 logits)."""
    dtype = torch.promote_types(student[0].dtype, torch.float32)
    return _PrototypeCE.apply(q.detach().to(dtype), float(student_temp), *student)


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Centred, sharpened teacher targets softmax((t - c) / T): (N, K) -> (N, K)."""
    return torch.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the teacher logits' mean over the GLOBAL batch (summed over ranks, so every rank holds one centre)."""
    from trainer.distributed import world

    total = teacher_logits.float().sum(0, keepdim=True)
    count = torch.tensor([float(teacher_logits.shape[0])], device=total.device)
    if world()[1] > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
        dist.all_reduce(count)
    return center * momentum + (total / count) * (1.0 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets with equal prototype mass over the GLOBAL batch (DINOv2 / SwAV): (N, K) -> (N, K), rows sum
    to 1. Row and column sums are all-reduced, so several ranks compute what one rank would on the whole batch."""
    from trainer.distributed import world

    world_size = world()[1]

    def all_sum(x: torch.Tensor) -> torch.Tensor:
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    logits = teacher_logits.float() / teacher_temp
    q = torch.exp(logits - all_sum(logits.max().reshape(1)) / world_size).T  # (K, N); a shift cancels in the ratios
    n = q.shape[1] * world_size
    k = q.shape[0]
    q /= all_sum(q.sum().reshape(1))
    for _ in range(iterations):
        q /= all_sum(q.sum(dim=1, keepdim=True))  # each prototype gets mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample mass 1/N
        q /= n
    return (q * n).T


def koleo(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019, DINOv2): -mean log distance of each L2-normalised feature to its
    nearest other feature in the batch; spreads the batch over the sphere. features (B, D) with B >= 2."""
    x = F.normalize(features.float(), dim=1, eps=eps)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


# ------------------------------------------------------------------------------------------------------ schedules


def cosine_to(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total_steps`` along a half cosine; ``end`` after."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warm-up of the teacher temperature from ``start`` to ``end`` over ``warmup_steps``, then ``end``."""
    if step >= warmup_steps or warmup_steps <= 0:
        return end
    return start + (end - start) * step / warmup_steps


@torch.no_grad()
def teacher_stats(q: torch.Tensor, loss_ce: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(4,) collapse signals: mean teacher entropy (log K: uniform collapse), student-teacher KL (the cross-entropy
    minus the teacher entropy), centre norm, and the perplexity of the batch-mean teacher distribution (the
    effective number of prototypes in use; 1: one-prototype collapse)."""
    qf = q.reshape(-1, q.shape[-1]).float()
    entropy = torch.special.entr(qf).sum(-1).mean()
    perplexity = torch.special.entr(qf.mean(0)).sum().exp()
    return torch.stack([entropy, loss_ce.detach().float() - entropy, center.float().norm(), perplexity])
