"""SimCLR: two augmented views of each image, NT-Xent over the (global) batch, optionally through GradCache."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.gradcache import gradcache_step
from trainer.loss_impl import LossImpl
from trainer.losses import contrastive_loss
from trainer.methods.base import Method


class SimCLR(Method):
    name = "simclr"

    def __init__(self, loss_cfg):
        super().__init__(loss_cfg)
        # the run's one NT-Xent implementation: loss.impl=auto checks the fused kernel once, then keeps its choice
        self._loss_impl = LossImpl(loss_cfg.impl)

    @property
    def loss_impl(self) -> LossImpl:
        return self._loss_impl

    def check_run(self, cfg, world_size: int, device: torch.device) -> str | None:
        if cfg.loss.impl == "fused":
            from trainer.fused_ntxent import fused_available

            if not fused_available(device):
                return (f"loss.impl=fused needs triton and a CUDA device (this run is on {device.type}); "
                        f"use loss.impl=auto or reference")
        return None

    def build_model(self, model_cfg, *, world_size: int) -> nn.Module:
        from trainer.encoder_io import read_init
        from trainer.models import build_contrastive_model

        return build_contrastive_model(model_cfg, read_init(model_cfg))

    def _nt_xent(self, step, z1: torch.Tensor, z2: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        step.observe(z1, z2)
        c = self.loss_cfg
        return contrastive_loss(z1, z2, pids, c.temperature, positives=c.positives, impl=self._loss_impl,
                                gather=c.gather)

    def forward_backward(self, step, batch: dict) -> torch.Tensor:
        v1, v2, pids = batch["view1"], batch["view2"], batch.get("pids")
        n = v1.shape[0]
        if step.micro_batch and step.micro_batch < n:
            no_sync = getattr(step.model, "no_sync", None)
            return gradcache_step(step.model, v1, v2, lambda a, b: self._nt_xent(step, a, b, pids), step.micro_batch,
                                  autocast=step.autocast(), no_sync=no_sync,
                                  scale_loss=step.scaler.scale if step.scaler is not None else None)
        with step.autocast():
            z = step.model(torch.cat([v1, v2]))  # (2N, D)
        loss = self._nt_xent(step, z[:n], z[n:], pids)
        step.backward(loss)
        return loss.detach()
