"""SimCLR: two augmented views of each image, NT-Xent over the (global) batch, optionally through GradCache."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.gradcache import gradcache_step
from trainer.methods.base import Method
from trainer.ntxent import NTXent


class SimCLR(Method):
    name = "simclr"

    def __init__(self, loss_cfg, *, device: torch.device | None = None, embed_dim: int | None = None):
        super().__init__(loss_cfg, device=device, embed_dim=embed_dim)
        # the run's one NT-Xent: loss.impl=auto checks the fused kernel once, then keeps its choice
        self._ntxent = NTXent.from_config(loss_cfg, device=device, dim=embed_dim)

    @property
    def ntxent(self) -> NTXent:
        return self._ntxent

    def check_run(self, cfg, world_size: int, device: torch.device) -> str | None:
        return self._ntxent.place(device, cfg.model.proj_dim) or None  # settled at construction on that device

    def build_model(self, model_cfg, *, world_size: int) -> nn.Module:
        from trainer.encoder_io import read_init
        from trainer.models import build_contrastive_model

        return build_contrastive_model(model_cfg, read_init(model_cfg))

    def _nt_xent(self, step, z1: torch.Tensor, z2: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        step.observe(z1, z2)
        return self._ntxent(z1, z2, pids)

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
