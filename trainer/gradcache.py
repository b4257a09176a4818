"""GradCache contrastive accumulation (Gao et al. 2021): a large batch on a small GPU, keeping every negative.

1. embed each micro-batch without a graph; 2. compute the loss on the whole batch of embeddings and its gradient
with respect to them; 3. re-embed micro-batch by micro-batch with a graph and back-propagate the cached gradient.
RNG states are replayed so stochastic layers match, and pass 1 leaves BatchNorm running statistics untouched.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn


class _RandState:
    """CPU (and current CUDA device) RNG state captured before a forward, to replay it for the re-forward."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm still normalises with batch statistics (train mode) but its running statistics are not updated."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, nbt in saved:
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def gradcache_step(
    model: nn.Module,                       # maps a micro-batch of views (2m, C, H, W) to projections (2m, D)
    view1: torch.Tensor,                    # (N, C, H, W)
    view2: torch.Tensor,                    # (N, C, H, W)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (z1 (N, D), z2 (N, D)) -> scalar loss
    micro_batch: int,
    autocast: contextlib.AbstractContextManager | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` on the full batch; returns the detached loss.

    ``no_sync`` (DDP's) suppresses the gradient all-reduce for every micro-batch but the last. ``scale_loss``
    (fp16: GradScaler.scale) scales the loss before its backward, and so every cached gradient.
    """
    autocast = autocast or contextlib.nullcontext()
    n = view1.shape[0]
    chunks = [(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]
    states, z1s, z2s = [], [], []
    with torch.no_grad(), frozen_bn_stats(model):
        for a, b in chunks:
            states.append(_RandState(view1.device))
            with autocast:
                z = model(torch.cat([view1[a:b], view2[a:b]]))  # (2m, D)
            z1s.append(z[: b - a].float())
            z2s.append(z[b - a:].float())
    z1 = torch.cat(z1s).requires_grad_(True)  # (N, D) leaf: its .grad is the cache
    z2 = torch.cat(z2s).requires_grad_(True)
    loss = loss_fn(z1, z2)
    (scale_loss(loss) if scale_loss is not None else loss).backward()
    g1, g2 = z1.grad, z2.grad
    for idx, ((a, b), state) in enumerate(zip(chunks, states)):
        last = idx == len(chunks) - 1
        sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_ctx, state.replay():
            with autocast:
                z = model(torch.cat([view1[a:b], view2[a:b]]))
            grad = torch.cat([g1[a:b], g2[a:b]]).to(z.dtype)  # (2m, D)
            z.backward(grad)
    return loss.detach()
