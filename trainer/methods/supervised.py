"""Supervised multi-label training behind the `Method` interface: backbone + linear head, BCE on the targets that are
not masked (NaN). Fine-tuning runs it through `trainer.steps.TrainStep`; it is not a `loss.method` for pretraining."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.methods.base import Method


class Classifier(nn.Module):
    """backbone -> linear head; forward returns logits (B, num_tasks)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class MaskedMultiLabelBCE(Method):
    """Batches are ``{"images": (B, C, H, W), "targets": (B, T) float with NaN = no label}``; the loss is the mean
    binary cross-entropy over the labelled entries. A batch without any labelled entry has no loss: the caller skips
    its step (an empty mean would be NaN, and a zero gradient would still move the weights through momentum and
    weight decay)."""

    name = "supervised"

    def __init__(self, num_tasks: int, *, device: torch.device | None = None):
        super().__init__(None, device=device)
        self.num_tasks = num_tasks

    def build_model(self, model_cfg, *, world_size: int = 1) -> Classifier:
        """The trunk ``model.init`` names (``model_cfg.arch``, ``in_channels``; read by trainer.encoder_io) + a
        linear head."""
        from trainer.encoder_io import read_init
        start = read_init(model_cfg)
        return Classifier(start.model, nn.Linear(start.feature_dim, self.num_tasks))

    def forward_backward(self, step, batch: dict) -> torch.Tensor:
        y = batch["targets"]
        mask = ~torch.isnan(y)
        with step.autocast():
            logits = step.model(batch["images"]).float()  # (B, T)
        loss = nn.functional.binary_cross_entropy_with_logits(logits[mask], y[mask])
        step.backward(loss)
        return loss.detach()
