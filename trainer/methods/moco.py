"""MoCo v2: query and momentum key encoders, InfoNCE against a queue of past keys, shuffle-BN."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import gather_no_grad
from trainer.losses import moco_infonce
from trainer.methods.base import Method


class MoCoV2(Method):
    name = "moco"
    # shuffle-BN already keeps BatchNorm statistics from telling which key belongs to which query
    global_bn_default = False

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.optim.micro_batch:
            raise ValueError("optim.micro_batch (GradCache) applies to SimCLR/MICLe; "
                             "MoCo's queue already decouples negatives from batch")
        if cfg.loss.moco_queue % cfg.data.batch_size:
            raise ValueError(f"loss.moco_queue={cfg.loss.moco_queue} must be a multiple of "
                             f"data.batch_size={cfg.data.batch_size}")

    def bn_splits(self, world_size: int) -> int:
        """Chunks for single-rank shuffle-BN; with several ranks the shuffle goes across ranks instead."""
        return self.loss_cfg.moco_bn_splits if self.loss_cfg.moco_shuffle_bn and world_size == 1 else 1

    def check_run(self, cfg, world_size: int, device: torch.device) -> str | None:
        splits = self.bn_splits(world_size)
        if splits > 1 and (cfg.data.batch_size % splits or cfg.data.batch_size // splits < 2):
            return (f"loss.moco_bn_splits={splits}: data.batch_size={cfg.data.batch_size} must split "
                    f"into {splits} equal BatchNorm chunks of >= 2 images on one rank")
        return None

    def build_model(self, model_cfg, *, world_size: int) -> nn.Module:
        from trainer.encoder_io import read_init
        from trainer.models import MoCo, build_contrastive_model

        c = self.loss_cfg
        encoder_q = build_contrastive_model(model_cfg, read_init(model_cfg))
        return MoCo(encoder_q, c.moco_queue, c.moco_momentum, c.moco_shuffle_bn, bn_splits=self.bn_splits(world_size))

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.encoder_q.backbone

    def compile(self, model: nn.Module, raw_model: nn.Module, mode: str) -> None:
        # the wrapper's queue bookkeeping stays eager; the two encoders are what costs
        raw_model.encoder_q.compile(mode=mode)
        raw_model.encoder_k.compile(mode=mode)

    def bn_scope(self, global_bn: bool) -> str:
        return "global" if global_bn else "shuffle" if self.loss_cfg.moco_shuffle_bn else "per rank"

    def broadcast_buffers(self, global_bn: bool) -> bool:
        # the queue is identical on every rank (gathered keys): no need to broadcast its 32 MB every step
        return False

    def forward_backward(self, step, batch: dict) -> torch.Tensor:
        with step.autocast():
            q, k = step.model(batch["view1"], batch["view2"])  # (N, D) each, normalised
        step.observe(q, k)
        loss = moco_infonce(q, k, step.raw.queue.detach(), self.loss_cfg.temperature)
        step.backward(loss)
        step.raw.enqueue(gather_no_grad(k))
        return loss.detach()
