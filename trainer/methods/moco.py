"""MoCo v2: query and momentum key encoders, InfoNCE against a queue of past keys, shuffle-BN (the `MoCo` module and
the `MoCoV2` method)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.distributed import gather_no_grad, world
from trainer.losses import moco_infonce
from trainer.methods.base import Method
from trainer.models import ContrastiveModel, build_contrastive_model, split_batchnorm


class MoCo(nn.Module):
    """MoCo v2: query encoder, momentum key encoder, and a queue of normalised keys (a buffer, so it checkpoints).

    Shuffle-BN keeps BatchNorm statistics from telling which key belongs to which query: with several ranks the
    keys are computed on a batch permuted across ranks; on one rank (``bn_splits`` > 1) both encoders normalise
    over ``bn_splits`` chunks of the batch, as ``bn_splits`` GPUs would, and the keys are computed on a batch
    permuted across those chunks (MoCo's single-GPU recipe). SyncBatchNorm (model.sync_bn) is the alternative.
    """

    def __init__(self, encoder_q: ContrastiveModel, queue_size: int = 65536, momentum: float = 0.999,
                 shuffle_bn: bool = True, bn_splits: int = 1):
        super().__init__()
        self.bn_splits = bn_splits if shuffle_bn else 1
        self.encoder_q = split_batchnorm(encoder_q, self.bn_splits) if self.bn_splits > 1 else encoder_q
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.momentum, self.shuffle_bn = momentum, shuffle_bn
        dim = self._out_dim(encoder_q)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _out_dim(model: ContrastiveModel) -> int:
        return [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1].out_features

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key = m * key + (1 - m) * query over parameters (BN statistics stay the key encoder's own, as in MoCo)."""
        q = [p.detach() for p in self.encoder_q.parameters()]
        k = [p for p in self.encoder_k.parameters()]
        torch._foreach_mul_(k, self.momentum)
        torch._foreach_add_(k, q, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries with ``keys`` (B, D) gathered from every rank; B must divide the queue."""
        size = self.queue.shape[0]
        b = keys.shape[0]
        if size % b:
            raise ValueError(f"loss.moco_queue={size} must be a multiple of the global batch {b}")
        # index arithmetic on the device: reading the pointer on the host would stall the GPU every step
        rows = (self.queue_ptr + torch.arange(b, device=self.queue.device)) % size  # (B,)
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.add_(b).remainder_(size)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised keys (B, D) for this rank's ``x``, with shuffle-BN across ranks when enabled."""
        rank, world_size = world()
        if self.shuffle_bn and world_size == 1 and self.bn_splits > 1:
            perm = torch.randperm(x.shape[0], device=x.device)  # each BN chunk gets keys of other chunks' queries
            k = F.normalize(self.encoder_k(x[perm]).float(), dim=1)
            return k[torch.argsort(perm)]
        if not (self.shuffle_bn and world_size > 1):
            return F.normalize(self.encoder_k(x).float(), dim=1)
        import torch.distributed as dist

        b = x.shape[0]
        x_all = gather_no_grad(x)  # (W*B, ...)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(perm, src=0)
        unperm = torch.argsort(perm)
        k = F.normalize(self.encoder_k(x_all[perm[rank * b:(rank + 1) * b]]).float(), dim=1)
        k_all = gather_no_grad(k)  # (W*B, D) in shuffled order
        return k_all[unperm[rank * b:(rank + 1) * b]]

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (q (B, D) normalised with gradient, k (B, D) normalised without); updates the key encoder first."""
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = self.keys(x_k)
        return q, k


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
