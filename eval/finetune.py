"""End-to-end fine-tuning: encoder + linear head per task, masked BCE, SGD (momentum 0.9) with cosine decay,
on-device augmentation (random resized crop, flip, small rotation, brightness/contrast), the checkpoint with the
best validation mean AUROC kept, and an optional lr x weight-decay grid (shaped like Azizi et al.'s 7 x 4).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np

from eval.features import EncoderSpec, Transform, build_encoder, eval_loader, iterate_valid
from eval.labels import select_targets
from eval.metrics import evaluate

# 7 learning rates x 4 weight decays (half-decade steps), the size of Azizi et al.'s fine-tuning sweep.
AZIZI_GRID = ((1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0), (0.0, 1e-5, 1e-4, 1e-3))


@dataclass
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    crop_scale_min: float = 0.6      # random resized crop area range (of the eval view)
    crop_ratio_max: float = 4 / 3    # aspect ratio drawn log-uniformly in [1 / max, max]
    hflip_prob: float = 0.5
    rotation_deg: float = 10.0
    brightness: float = 0.1          # additive jitter in normalised units
    contrast: float = 0.1            # multiplicative jitter
    max_images_in_memory: int = 20000  # subsets up to this many images are decoded once and kept (float16)
    seed: int = 0


def augment(x, gen, cfg: FinetuneConfig):
    """(B, C, H, W) -> (B, C, H, W): per-sample random resized crop + flip + rotation as one affine resample,
    then brightness/contrast; all on the tensor's device (CPU or GPU)."""
    import torch
    import torch.nn.functional as F
    b = x.shape[0]
    dev = x.device

    def u(lo, hi):
        return torch.rand(b, generator=gen, device="cpu").to(dev) * (hi - lo) + lo
    area = u(cfg.crop_scale_min, 1.0)
    log_ratio = u(-math.log(cfg.crop_ratio_max), math.log(cfg.crop_ratio_max))
    sx = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    tx, ty = u(-1, 1) * (1 - sx), u(-1, 1) * (1 - sy)
    flip = torch.where(u(0, 1) < cfg.hflip_prob, -1.0, 1.0)
    angle = u(-cfg.rotation_deg, cfg.rotation_deg) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([sx * cos * flip, -sy * sin, tx], 1),
                         torch.stack([sx * sin * flip, sy * cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    scale = u(1 - cfg.contrast, 1 + cfg.contrast).view(b, 1, 1, 1).to(x.dtype)
    shift = u(-cfg.brightness, cfg.brightness).view(b, 1, 1, 1).to(x.dtype)
    return out * scale + shift


class ImageSource:
    """Images (+ raw labels) of one split, optionally only some patients; decoded once into host memory when
    they fit ``max_images``, otherwise streamed from the DALI loader every epoch (no shuffling then)."""

    def __init__(self, make_loader, patient_ids: np.ndarray | None, max_images: int):
        self.make_loader, self.max_images = make_loader, max_images
        self.keep = None if patient_ids is None else set(int(p) for p in patient_ids)
        self.images = self.labels = None
        self.num_images = 0
        self._try_load()

    def _filtered(self):
        import torch
        for images, labels, pids in iterate_valid(self.make_loader()):
            if self.keep is not None:
                mask = torch.tensor([int(p) in self.keep for p in pids.tolist()], dtype=torch.bool)
                if not mask.any():
                    continue
                idx = mask.nonzero().squeeze(1)
                images, labels = images[idx.to(images.device)], labels[idx.to(labels.device)]
            yield images, labels

    def _try_load(self):
        import torch
        imgs, lbls, n = [], [], 0
        for images, labels in self._filtered():
            n += images.shape[0]
            if n > self.max_images:
                self.num_images = None  # unknown until a streamed epoch completes
                return
            imgs.append(images.to("cpu", torch.float16).contiguous())
            lbls.append(labels.float().cpu())
        self.images = torch.cat(imgs) if imgs else torch.zeros(0)
        self.labels = torch.cat(lbls) if lbls else torch.zeros(0)
        self.num_images = n

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def batches(self, batch_size: int, gen=None):
        import torch
        if not self.in_memory:
            yield from self._filtered()
            return
        n = self.images.shape[0]
        order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield self.images[idx].float(), self.labels[idx]


def _predict(model, head, source: ImageSource, batch_size: int, torch_device) -> tuple[np.ndarray, np.ndarray]:
    import torch
    model.eval()
    scores, labels = [], []
    with torch.no_grad(), torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=torch_device.type == "cuda"):
        for images, lbl in source.batches(batch_size):
            x = images.to(torch_device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            scores.append(torch.sigmoid(head(model(x)).float()).cpu().numpy())
            labels.append(lbl.float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(labels)


@dataclass
class FinetuneRun:
    lr: float
    weight_decay: float
    best_epoch: int
    best_val_auroc: float
    history: list[dict] = field(default_factory=list)
    state: dict | None = None  # best backbone + head weights (CPU)


def train_one(spec: EncoderSpec, train: ImageSource, val: ImageSource, tasks: list[str], label_names: list[str],
              cfg: FinetuneConfig, *, policy: str, device: str, log=print) -> FinetuneRun:
    """Fine-tune one (lr, weight decay) setting; keep the epoch with the best validation mean AUROC."""
    import torch
    torch_device = torch.device("cuda" if device == "gpu" else "cpu")
    torch.manual_seed(cfg.seed)
    model, dim = build_encoder(spec)
    head = torch.nn.Linear(dim, len(tasks))
    model, head = model.to(torch_device).to(memory_format=torch.channels_last), head.to(torch_device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil((train.num_images or 1) / cfg.batch_size) if train.in_memory else None
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
             if steps_per_epoch else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs)))
    gen = torch.Generator().manual_seed(cfg.seed)
    run = FinetuneRun(cfg.lr, cfg.weight_decay, -1, -math.inf)
    for epoch in range(cfg.epochs):
        model.train()
        t0, loss_sum, n_seen = time.perf_counter(), 0.0, 0
        for images, raw in train.batches(cfg.batch_size, gen):
            y = torch.from_numpy(select_targets(raw.float().cpu().numpy(), label_names, tasks, policy)).to(torch_device)
            mask = ~torch.isnan(y)
            if not mask.any() or images.shape[0] < 2:  # BatchNorm needs 2+ samples
                continue
            x = augment(images.to(torch_device, non_blocking=True), gen, cfg).contiguous(memory_format=torch.channels_last)
            with torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=torch_device.type == "cuda"):
                logits = head(model(x)).float()  # (B, T)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], y[mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if steps_per_epoch:
                sched.step()
            loss_sum += float(loss.detach()) * images.shape[0]
            n_seen += images.shape[0]
        if not steps_per_epoch:
            sched.step()
        val_scores, val_raw = _predict(model, head, val, cfg.batch_size, torch_device)
        val_auroc = evaluate(select_targets(val_raw, label_names, tasks, policy), val_scores, tasks).mean_auroc
        run.history.append({"epoch": epoch, "train_loss": loss_sum / max(1, n_seen), "val_mean_auroc": _num(val_auroc),
                            "seconds": time.perf_counter() - t0, "images": n_seen})
        log(f"  lr={cfg.lr:g} wd={cfg.weight_decay:g} epoch {epoch}: loss {loss_sum / max(1, n_seen):.4f} val mean AUROC {val_auroc:.4f}")
        if math.isfinite(val_auroc) and val_auroc > run.best_val_auroc or run.state is None:
            run.best_epoch, run.best_val_auroc = epoch, val_auroc
            run.state = {"backbone": copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()}),
                         "head": copy.deepcopy({k: v.cpu() for k, v in head.state_dict().items()})}
    return run


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def finetune(spec: EncoderSpec, shard_root, tasks: list[str], label_names: list[str], cfg: FinetuneConfig, *,
             grid: tuple[tuple[float, ...], tuple[float, ...]] | None = None, policy: str = "u-ignore", device: str = "cpu",
             transform: Transform = Transform(), train_patients: np.ndarray | None = None, num_threads: int = 2,
             loader_factory=None, log=print) -> tuple[dict, dict, dict]:
    """Fine-tune over the grid (or cfg.lr / cfg.weight_decay), pick the run and epoch with the best validation mean
    AUROC, score the test split with it. ``train_patients`` restricts training to those patient ids (label fractions).
    Returns (result dict, test predictions {"targets", "scores", "pids"}, best weights {"backbone", "head"} on CPU)."""
    import torch
    make = loader_factory or eval_loader

    def loader_for(split):
        return lambda: make(shard_root, split, batch_size=cfg.batch_size, device=device, transform=transform,
                            channels=spec.in_channels, num_threads=num_threads)
    train = ImageSource(loader_for("train"), train_patients, cfg.max_images_in_memory)
    val = ImageSource(loader_for("val"), None, cfg.max_images_in_memory)
    lrs, wds = grid if grid else ((cfg.lr,), (cfg.weight_decay,))
    runs = []
    for lr in lrs:
        for wd in wds:
            runs.append(train_one(spec, train, val, tasks, label_names, replace_cfg(cfg, lr=lr, weight_decay=wd),
                                  policy=policy, device=device, log=log))
    best = max(runs, key=lambda r: r.best_val_auroc if math.isfinite(r.best_val_auroc) else -math.inf)
    torch_device = torch.device("cuda" if device == "gpu" else "cpu")
    model, dim = build_encoder(spec)
    head = torch.nn.Linear(dim, len(tasks))
    model.load_state_dict(best.state["backbone"])
    head.load_state_dict(best.state["head"])
    model, head = model.to(torch_device).to(memory_format=torch.channels_last), head.to(torch_device)
    scores, raw, pids = [], [], []
    model.eval()
    with torch.no_grad(), torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=torch_device.type == "cuda"):
        for images, lbl, pid in iterate_valid(loader_for("test")()):
            x = images.to(torch_device).contiguous(memory_format=torch.channels_last)
            scores.append(torch.sigmoid(head(model(x)).float()).cpu().numpy())
            raw.append(lbl.float().cpu().numpy())
            pids.append(pid.cpu().numpy().astype(np.int64))
    scores, targets = np.concatenate(scores), select_targets(np.concatenate(raw), label_names, tasks, policy)
    result = evaluate(targets, scores, tasks).to_dict()
    result.update(protocol="finetune", uncertainty=policy, chosen_lr=best.lr, chosen_weight_decay=best.weight_decay,
                  best_epoch=best.best_epoch, best_val_mean_auroc=_num(best.best_val_auroc),
                  train_images=train.num_images, train_in_memory=train.in_memory,
                  grid=[{"lr": r.lr, "weight_decay": r.weight_decay, "best_val_mean_auroc": _num(r.best_val_auroc),
                         "best_epoch": r.best_epoch, "history": r.history} for r in runs],
                  config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    return result, {"targets": targets, "scores": scores, "pids": np.concatenate(pids)}, best.state


def replace_cfg(cfg: FinetuneConfig, **kw) -> FinetuneConfig:
    import dataclasses
    return dataclasses.replace(cfg, **kw)
