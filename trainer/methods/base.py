"""The interface every self-supervised method implements: config rules, loader needs, model parts, the step's
forward + loss + backward, and the method's extra log fields."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn as nn


class Method(ABC):
    """One method (SimCLR, MoCo v2, MICLe, ...). Class attributes state what it needs from the rest of the trainer;
    an instance serves one run (``loss_cfg`` is the run's [loss] section; ``device`` and ``embed_dim``, where known,
    are where the loss runs and the projections' width, so a method can settle what depends on them once).

    Extra training state (e.g. MoCo's queue) lives in model buffers, so it checkpoints and resumes with the model's
    state dict and the checkpoint format does not depend on the method.
    """

    name = ""
    micle_pairs = False        # loader: two images of one patient per sample instead of two views of one image
    global_bn_default = True   # model.sync_bn=auto on several ranks: BatchNorm over the global batch
    multi_crop = False         # loader: global + local crops grouped by size (dali_pipes.multicrop) instead of 2 views

    def __init__(self, loss_cfg, *, device: torch.device | None = None, embed_dim: int | None = None):
        self.loss_cfg = loss_cfg

    @classmethod
    def check_config(cls, cfg) -> None:
        """Cross-field rules of this method on a whole `Config`; raise ValueError with one line."""

    def check_run(self, cfg, world_size: int, device: torch.device) -> str | None:
        """A one-line reason this run cannot start on ``world_size`` ranks of ``device``, or None."""
        return None

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """The run's length, for methods whose own schedules (e.g. DINO's teacher momentum) follow the step."""

    @abstractmethod
    def build_model(self, model_cfg, *, world_size: int) -> nn.Module:
        """The trainable model (before global BN, device placement, DDP and compile)."""

    def backbone(self, model: nn.Module) -> nn.Module:
        """The encoder that `encoder.pt` exports and the kNN monitor embeds with."""
        return model.backbone

    def compile(self, model: nn.Module, raw_model: nn.Module, mode: str) -> None:
        model.compile(mode=mode)

    def bn_scope(self, global_bn: bool) -> str:
        return "global" if global_bn else "per rank"

    def broadcast_buffers(self, global_bn: bool) -> bool:
        """DDP's per-step buffer broadcast; global BN's running statistics are identical on every rank already."""
        return not global_bn

    @property
    def ntxent(self):
        """The run's NT-Xent module (`trainer.ntxent.NTXent`) for methods that use it, else None."""
        return None

    @abstractmethod
    def forward_backward(self, step, batch: dict) -> torch.Tensor:
        """Forward, loss and backward for one batch through ``step`` (a `trainer.steps.TrainStep`: its model, autocast,
        health observer and scaled backward); returns the detached loss (no host sync)."""

    def log_fields(self, loader) -> dict:
        """Extra fields of a metrics row."""
        return {}
