"""One optimiser step per method (SimCLR / MICLe NT-Xent, optionally GradCache; MoCo v2 InfoNCE with its queue).

Shared by `trainer/pretrain.py` and `bench/model_bench.py`, so the benchmark times the trainer's real step.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from trainer.distributed import gather_no_grad
from trainer.gradcache import gradcache_step
from trainer.loss_impl import LossImpl
from trainer.health import HealthMeter, grad_norm
from trainer.losses import contrastive_loss, moco_infonce
from trainer.optim import set_lr

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision=fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    return precision


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


class TrainStep:
    """Call with a batch dict and the step's lr: forward, loss, backward, (clip), optimiser step. Returns the
    detached loss tensor (no host sync). With a ``health`` meter it also accumulates the health metrics on the device
    (the embeddings the loss sees, the gradient norm before clipping, LARS trust ratios)."""

    def __init__(self, model: nn.Module, raw_model: nn.Module, optimizer: torch.optim.Optimizer, loss_cfg, *,
                 precision: str, device: torch.device, micro_batch: int = 0, grad_clip_norm: float = 0.0,
                 health: HealthMeter | None = None):
        self.model, self.raw, self.optimizer, self.loss_cfg = model, raw_model, optimizer, loss_cfg
        self.precision, self.device = precision, device
        self.micro_batch, self.grad_clip_norm = micro_batch, grad_clip_norm
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.is_moco = loss_cfg.method == "moco"
        # the run's one NT-Xent implementation: loss.impl=auto checks the fused kernel once, then keeps its choice
        self.loss_impl = None if self.is_moco else LossImpl(loss_cfg.impl)
        self.health = health

    def autocast(self):
        return autocast_context(self.precision, self.device)

    def _observe(self, z1: torch.Tensor, z2: torch.Tensor) -> None:
        if self.health is not None:
            self.health.add_embeddings(z1, z2)

    def _nt_xent(self, z1: torch.Tensor, z2: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        self._observe(z1, z2)
        c = self.loss_cfg
        return contrastive_loss(z1, z2, pids, c.temperature, positives=c.positives, impl=self.loss_impl,
                                gather=c.gather)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def forward_backward(self, batch: dict) -> torch.Tensor:
        v1, v2, pids = batch["view1"], batch["view2"], batch.get("pids")
        n = v1.shape[0]
        if self.is_moco:
            with self.autocast():
                q, k = self.model(v1, v2)  # (N, D) each, normalised
            self._observe(q, k)
            loss = moco_infonce(q, k, self.raw.queue.detach(), self.loss_cfg.temperature)
            self._backward(loss)
            self.raw.enqueue(gather_no_grad(k))
            return loss.detach()
        if self.micro_batch and self.micro_batch < n:
            no_sync = getattr(self.model, "no_sync", None)
            return gradcache_step(self.model, v1, v2, lambda a, b: self._nt_xent(a, b, pids), self.micro_batch,
                                  autocast=self.autocast(), no_sync=no_sync,
                                  scale_loss=self.scaler.scale if self.scaler is not None else None)
        with self.autocast():
            z = self.model(torch.cat([v1, v2]))  # (2N, D)
        loss = self._nt_xent(z[:n], z[n:], pids)
        self._backward(loss)
        return loss.detach()

    def __call__(self, batch: dict, lr: float) -> torch.Tensor:
        set_lr(self.optimizer, lr)
        loss = self.forward_backward(batch)
        if self.grad_clip_norm > 0 or self.health is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # the norm of the true gradient; step() will not unscale again
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.grad_clip_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
            else:
                norm = grad_norm(params)
            if self.health is not None:
                self.health.add_grad_norm(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        trust = getattr(self.optimizer, "last_trust_ratios", None)
        if self.health is not None and trust is not None:
            self.health.add_trust_ratios(trust)
        self.optimizer.zero_grad(set_to_none=True)
        return loss
