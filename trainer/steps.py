"""One optimiser step: the method's forward + loss + backward (`trainer.methods`), then clipping and the optimiser.

Shared by `trainer/pretrain.py`, `bench/model_bench.py` (it times the real step) and `eval/finetune.py`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from trainer.health import HealthMeter, grad_norm
from trainer.methods import Method, build_method
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
                 health: HealthMeter | None = None, method: Method | None = None):
        self.model, self.raw, self.optimizer, self.loss_cfg = model, raw_model, optimizer, loss_cfg
        self.precision, self.device = precision, device
        self.micro_batch, self.grad_clip_norm = micro_batch, grad_clip_norm
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.method = method if method is not None else build_method(loss_cfg, device=device)
        self.health = health

    @property
    def ntxent(self):
        """The run's NT-Xent module (`trainer.ntxent.NTXent`), None for a method without one."""
        return self.method.ntxent

    def autocast(self):
        return autocast_context(self.precision, self.device)

    def observe(self, z1: torch.Tensor, z2: torch.Tensor) -> None:
        """Hand the embeddings the loss sees to the health meter (device-side, no host sync)."""
        if self.health is not None:
            self.health.add_embeddings(z1, z2)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def forward_backward(self, batch: dict) -> torch.Tensor:
        return self.method.forward_backward(self, batch)

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
