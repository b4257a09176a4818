"""DINO (Caron et al. 2021) self-distillation: a student on 2 global + N local crops matches an EMA teacher's centred,
sharpened prototype distribution on the global crops; the teacher, the centre and the step live in model buffers /
parameters, so a checkpoint resumes them exactly. Options from DINOv2: Sinkhorn-Knopp targets, KoLeo.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import dino_loss as D
from trainer.methods.base import Method


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2 normalisation, then K prototypes through a weight-normalised linear layer whose
    gain is fixed at 1 (``norm_last_layer``) or learnt."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(layers, 1) - 1):
            mods += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        mods.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight_norm's direction v (K, bottleneck); the last layer is what stays frozen for the first epoch
        self.last_v = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, bottleneck_dim), std=0.02))
        self.last_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))

    def last_layer(self) -> list[nn.Parameter]:
        return [p for p in (self.last_v, self.last_g) if p is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        w = F.normalize(self.last_v, dim=1)
        return F.linear(z, w if self.last_g is None else w * self.last_g)


class DINOModel(nn.Module):
    """Student (``backbone``, ``head``) with gradient, teacher (``teacher.backbone``, ``teacher.head``) updated by
    EMA only, the centre (1, K) and the optimiser step count as buffers. ``forward`` runs the student, in one call
    (DDP's one forward per backward) over the global and the local crops."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.teacher = nn.Module()
        self.teacher.backbone = copy.deepcopy(backbone)
        self.teacher.head = copy.deepcopy(head)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, head.last_v.shape[0]))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None):
        """(G*B, C, S, S), (N*B, C, L, L) or None -> (global logits (G*B, K), local logits (N*B, K) or None, global
        backbone features (G*B, D))."""
        f_global = self.backbone(global_crops)
        local = self.head(self.backbone(local_crops)) if local_crops is not None else None
        return self.head(f_global), local, f_global

    @torch.no_grad()
    def teacher_logits(self, global_crops: torch.Tensor) -> torch.Tensor:
        return self.teacher.head(self.teacher.backbone(global_crops))

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.head.parameters())

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """teacher = m * teacher + (1 - m) * student over parameters."""
        t = list(self.teacher.backbone.parameters()) + list(self.teacher.head.parameters())
        s = [p.detach() for p in self.student_parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)


class DINO(Method):
    name = "dino"
    multi_crop = True          # loader: 2 global + N local crops (dali_pipes.multicrop)
    global_bn_default = False  # ViTs have no BatchNorm; a ResNet student keeps per-rank statistics (as DINO)

    def __init__(self, loss_cfg, *, device: torch.device | None = None, embed_dim: int | None = None):
        super().__init__(loss_cfg, device=device, embed_dim=embed_dim)
        self.total_steps, self.steps_per_epoch = 1, 1
        self._step: int | None = None  # host copy of the model's step buffer (read once, at the first step)
        self._hooked = None
        self._last: dict = {}

    @classmethod
    def check_config(cls, cfg) -> None:
        c = cfg.loss
        if cfg.optim.micro_batch:
            raise ValueError("optim.micro_batch (GradCache) applies to SimCLR/MICLe, not to DINO")
        if c.dino_out_dim < 2 or c.dino_bottleneck_dim < 1 or c.dino_hidden_dim < 1 or c.dino_head_layers < 1:
            raise ValueError("loss.dino_out_dim must be >= 2, dino_bottleneck_dim, dino_hidden_dim and "
                             "dino_head_layers >= 1")
        if min(c.dino_student_temp, c.dino_teacher_temp, c.dino_warmup_teacher_temp) <= 0:
            raise ValueError("loss.dino_student_temp, dino_teacher_temp and dino_warmup_teacher_temp must be > 0")
        if not (0.0 <= c.dino_momentum <= 1.0 and 0.0 <= c.dino_center_momentum < 1.0):
            raise ValueError("loss.dino_momentum must be in [0, 1] and loss.dino_center_momentum in [0, 1)")
        if c.dino_koleo_weight < 0 or c.dino_sinkhorn_iters < 1:
            raise ValueError("loss.dino_koleo_weight must be >= 0 and loss.dino_sinkhorn_iters >= 1")
        if c.dino_koleo_weight > 0 and cfg.data.batch_size < 2:
            raise ValueError("loss.dino_koleo_weight > 0 needs data.batch_size >= 2 (nearest neighbours)")

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        self.total_steps, self.steps_per_epoch = max(int(total_steps), 1), max(int(steps_per_epoch), 1)

    def build_model(self, model_cfg, *, world_size: int) -> nn.Module:
        from trainer.encoder_io import read_init

        c = self.loss_cfg
        start = read_init(model_cfg)
        backbone, dim = start.model, start.feature_dim
        head = DINOHead(dim, c.dino_out_dim, c.dino_hidden_dim, c.dino_bottleneck_dim, c.dino_head_layers,
                        c.dino_norm_last_layer)
        return DINOModel(backbone, head)

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.teacher.backbone  # the encoder DINO evaluates and exports

    def compile(self, model: nn.Module, raw_model: nn.Module, mode: str) -> None:
        raw_model.backbone.compile(mode=mode)
        raw_model.teacher.backbone.compile(mode=mode)

    def bn_scope(self, global_bn: bool) -> str:
        return "global" if global_bn else "per rank (a ViT has none)"

    # ---- schedules, all pure functions of the step
    def schedules(self, step: int) -> dict:
        c = self.loss_cfg
        warm = int(round(c.dino_warmup_teacher_temp_epochs * self.steps_per_epoch))
        return {"momentum": D.cosine_to(step, self.total_steps, c.dino_momentum, 1.0),
                "teacher_temp": D.teacher_temperature(step, warm, c.dino_warmup_teacher_temp, c.dino_teacher_temp),
                "freeze_last_layer": step < int(round(c.dino_freeze_last_layer_epochs * self.steps_per_epoch))}

    def _weight_decay(self, optimizer, step: int) -> float | None:
        end = self.loss_cfg.dino_weight_decay_end
        groups = [g for g in optimizer.param_groups if g.setdefault("dino_wd_start", g["weight_decay"]) > 0]
        if end < 0 or not groups:
            return None
        wd = D.cosine_to(step, self.total_steps, groups[0]["dino_wd_start"], end)
        for g in groups:
            g["weight_decay"] = wd
        return wd

    def _ema_after_optimizer_step(self, step_obj) -> None:
        """The teacher follows the student right after each optimiser step (a hook, so TrainStep stays generic)."""
        if self._hooked is step_obj.optimizer:
            return

        def hook(optimizer, args, kwargs):
            step_obj.raw.ema_update(self._last["momentum"])

        step_obj.optimizer.register_step_post_hook(hook)
        self._hooked = step_obj.optimizer

    def forward_backward(self, step, batch: dict) -> torch.Tensor:
        raw, c = step.raw, self.loss_cfg
        self._ema_after_optimizer_step(step)
        if self._step is None:
            self._step = int(raw.step)  # one host read per run (after a resume it holds the checkpoint's step)
        sched = self.schedules(self._step)
        sched["weight_decay"] = self._weight_decay(step.optimizer, self._step)
        self._last = sched
        if "global" in batch:
            g = batch["global"]
            local = batch["local"]
            local = local.flatten(0, 1) if local.numel() else None
        else:  # a two-view loader (synthetic data): two global crops, no local ones
            g = torch.stack([batch["view1"], batch["view2"]])
            local = None
        n_global, b = g.shape[0], g.shape[1]
        g = g.flatten(0, 1)
        with step.autocast():
            s_global, s_local, f_global = step.model(g, local)
            t_logits = raw.teacher_logits(g)
        if c.dino_centering == "sinkhorn":
            q = D.sinkhorn_knopp(t_logits, sched["teacher_temp"], c.dino_sinkhorn_iters)
        else:
            q = D.teacher_probs(t_logits, raw.center, sched["teacher_temp"])
        q = q.reshape(n_global, b, -1)
        crops = list(s_global.chunk(n_global)) + (list(s_local.chunk(s_local.shape[0] // b)) if s_local is not None
                                                  else [])
        loss_ce = D.prototype_ce(crops, q, c.dino_student_temp)
        loss = loss_ce
        if c.dino_koleo_weight > 0:
            loss = loss + c.dino_koleo_weight * sum(D.koleo(f) for f in f_global.chunk(n_global))
        step.observe(f_global[:b], f_global[b:2 * b])
        step.backward(loss)
        if sched["freeze_last_layer"]:
            for p in raw.head.last_layer():
                p.grad = None  # no update at all (not even momentum or weight decay), as DINO's first epoch
        with torch.no_grad():
            if c.dino_centering != "sinkhorn":
                raw.center.copy_(D.updated_center(raw.center, t_logits, c.dino_center_momentum))
            if step.health is not None and hasattr(step.health, "add_dino"):
                step.health.add_dino(D.teacher_stats(q, loss_ce, raw.center))
            raw.step.add_(1)
        self._step += 1
        return loss.detach()

    def log_fields(self, loader) -> dict:
        s = self._last
        row = {"dino/teacher_temp": s.get("teacher_temp"), "dino/momentum": s.get("momentum")}
        if s.get("weight_decay") is not None:
            row["dino/weight_decay"] = s["weight_decay"]
        return {k: v for k, v in row.items() if v is not None}
