"""End-to-end fine-tuning: encoder + linear head per task, masked BCE, SGD (momentum 0.9) with cosine decay, batches
reshuffled every epoch and augmented on the device (dali_pipes.labelled), the checkpoint with
the best validation mean AUROC kept, and an optional lr x weight-decay grid (shaped like Azizi et al.'s 7 x 4).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np

from dali_pipes.augment import AugmentConfig
from eval.devices import torch_device
from eval.features import EncoderSpec, Transform, build_encoder, eval_loader, iterate_valid
from eval.labels import LabelPolicy, select_targets, split_counts
from eval.metrics import evaluate
from trainer.methods.supervised import Classifier, MaskedMultiLabelBCE
from trainer.schedules import warmup_cosine
from trainer.steps import TrainStep, autocast_context, resolve_precision

# 7 learning rates x 4 weight decays, the size of Azizi et al.'s (2021) fine-tuning sweep. Their exact values
# (supplementary material) could not be checked offline, so this is our own half-decade grid around the SGD
# defaults; pass --grid 'LR,...:WD,...' to reproduce a published sweep exactly.
AZIZI_GRID = ((1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0), (0.0, 1e-5, 1e-4, 1e-3))

# Fine-tuning augmentation (milder than pretraining's: labels must survive it): random resized crop of >= 60% of
# the area, flip, +-10 degree rotation, light brightness/contrast jitter, no blur. Any dali_pipes preset may
# replace it (``--augment``).
FINETUNE_AUGMENT = AugmentConfig(name="finetune", crop_scale_min=0.6, hflip_prob=0.5, rotation_deg=10.0,
                                 jitter_prob=0.8, brightness=0.1, contrast=0.1, blur_prob=0.0)


def augment_config(name: str = "finetune", **overrides) -> AugmentConfig:
    """``finetune`` (FINETUNE_AUGMENT) or a dali_pipes preset name, with fields overridden (None = keep)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name == "finetune":
        return dataclasses.replace(FINETUNE_AUGMENT, **overrides).validated()
    return AugmentConfig.preset(name, **overrides)


@dataclass
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    augment: AugmentConfig = FINETUNE_AUGMENT
    max_images_in_memory: int = 20000  # validation images up to this many are decoded once and kept (float16)
    seed: int = 0

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "augment"},
                "augment": dataclasses.asdict(self.augment)}


class ImageSource:
    """The deterministic eval view of one split (+ raw labels, patient ids), decoded once into host memory when it
    fits ``max_images``, otherwise streamed from the DALI loader at every pass (order does not matter for scoring)."""

    def __init__(self, make_loader, max_images: int):
        self.make_loader, self.max_images = make_loader, max_images
        self.images = self.labels = self.pids = None
        self._try_load()

    def _try_load(self):
        import torch
        imgs, lbls, pids, n = [], [], [], 0
        for images, labels, pid in iterate_valid(self.make_loader()):
            n += images.shape[0]
            if n > self.max_images:
                return
            imgs.append(images.to("cpu", torch.float16).contiguous())
            lbls.append(labels.float().cpu())
            pids.append(pid.cpu().long())
        self.images = torch.cat(imgs) if imgs else torch.zeros(0)
        self.labels = torch.cat(lbls) if lbls else torch.zeros(0)
        self.pids = torch.cat(pids) if pids else torch.zeros(0, dtype=torch.long)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def batches(self, batch_size: int):
        if not self.in_memory:
            for images, labels, pids in iterate_valid(self.make_loader()):
                yield images, labels, pids
            return
        for i in range(0, self.images.shape[0], batch_size):
            rows = slice(i, i + batch_size)
            yield self.images[rows].float(), self.labels[rows], self.pids[rows]


def _predict(model, head, source: ImageSource, batch_size: int, dev,
             precision: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch
    model.eval()
    scores, labels, pids = [], [], []
    with torch.no_grad(), autocast_context(precision, dev):
        for images, lbl, pid in source.batches(batch_size):
            x = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            scores.append(torch.sigmoid(head(model(x)).float()).cpu().numpy())
            labels.append(lbl.float().cpu().numpy())
            pids.append(pid.cpu().numpy().astype(np.int64))
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(pids)


@dataclass
class FinetuneRun:
    lr: float
    weight_decay: float
    best_epoch: int
    best_val_auroc: float
    history: list[dict] = field(default_factory=list)
    state: dict | None = None  # best backbone + head weights (CPU)


def train_one(spec: EncoderSpec, train, val: ImageSource, tasks: list[str], label_names: list[str],
              cfg: FinetuneConfig, *, policy: LabelPolicy, device: str, val_patients: np.ndarray | None = None,
              log=print) -> FinetuneRun:
    """Fine-tune one (lr, weight decay) setting on ``train`` (a FinetuneLoader: reshuffled and re-augmented every
    epoch); keep the epoch with the best validation mean AUROC (on ``val_patients``' images only, when given). Each
    optimiser step is the trainer's (`trainer.steps.TrainStep` with `MaskedMultiLabelBCE`)."""
    import torch
    dev = torch_device(device)
    torch.manual_seed(cfg.seed)
    model, dim = build_encoder(spec)
    head = torch.nn.Linear(dim, len(tasks))
    model, head = model.to(dev).to(memory_format=torch.channels_last), head.to(dev)
    net = Classifier(model, head)
    opt = torch.optim.SGD(list(net.parameters()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    precision = resolve_precision("auto", dev)  # bf16 autocast on CUDA, fp32 on the CPU
    step_fn = TrainStep(net, net, opt, None, precision=precision, device=dev,
                        method=MaskedMultiLabelBCE(len(tasks), device=dev))
    # A final batch of one image is skipped (BatchNorm needs 2+ samples); it is elsewhere in the next epoch's order.
    n = len(train.index)
    steps_per_epoch = n // cfg.batch_size + (n % cfg.batch_size >= 2)
    total_steps, step = max(1, cfg.epochs * steps_per_epoch), 0
    run = FinetuneRun(cfg.lr, cfg.weight_decay, -1, -math.inf)
    for epoch in range(cfg.epochs):
        net.train()
        train.set_epoch(epoch)
        t0, loss_sum, n_seen = time.perf_counter(), 0.0, 0
        for batch in train:
            images, raw = batch["images"], batch["labels"]
            if images.shape[0] < 2:
                continue
            y = select_targets(raw.float().cpu().numpy(), label_names, tasks, policy)
            if not np.isnan(y).all():
                x = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                lr = warmup_cosine(step, peak_lr=cfg.lr, warmup_steps=0, total_steps=total_steps)
                loss = step_fn({"images": x, "targets": torch.from_numpy(y).to(dev)}, lr)
                loss_sum += float(loss) * images.shape[0]
                n_seen += images.shape[0]
            step += 1  # also on all-masked batches: the schedule follows the planned steps
        val_scores, val_raw, val_pids = _predict(model, head, val, cfg.batch_size, dev, precision)
        rows = slice(None) if val_patients is None else np.isin(val_pids, val_patients)
        val_targets = select_targets(val_raw[rows], label_names, tasks, policy)
        val_auroc = evaluate(val_targets, val_scores[rows], tasks).mean_auroc
        run.history.append({"epoch": epoch, "train_loss": loss_sum / max(1, n_seen), "val_mean_auroc": _num(val_auroc),
                            "seconds": time.perf_counter() - t0, "images": n_seen})
        log(f"  lr={cfg.lr:g} wd={cfg.weight_decay:g} epoch {epoch}: loss {loss_sum / max(1, n_seen):.4f} "
            f"val mean AUROC {val_auroc:.4f}")
        if math.isfinite(val_auroc) and val_auroc > run.best_val_auroc or run.state is None:
            run.best_epoch, run.best_val_auroc = epoch, val_auroc
            run.state = {"backbone": copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()}),
                         "head": copy.deepcopy({k: v.cpu() for k, v in head.state_dict().items()})}
    return run


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def finetune(spec: EncoderSpec, shard_root, tasks: list[str], label_names: list[str], cfg: FinetuneConfig, *,
             grid: tuple[tuple[float, ...], tuple[float, ...]] | None = None, policy: LabelPolicy,
             device: str = "cpu", transform: Transform = Transform(), train_patients: np.ndarray | None = None,
             val_patients: np.ndarray | None = None, num_threads: int = 2, loader_factory=None,
             log=print) -> tuple[dict, dict, dict]:
    """Fine-tune over the grid (or cfg.lr / cfg.weight_decay), pick the run and epoch with the best validation mean
    AUROC, score the test split with it. ``train_patients`` restricts training to those patient ids (label fractions);
    ``val_patients`` restricts the validation images that choose the epoch and grid cell (fraction-matched val).
    Returns (result dict, test predictions {"targets", "scores", "pids"}, best weights {"backbone", "head"} on CPU)."""
    import torch

    from dali_pipes.labelled import FinetuneLoader, build_labelled_index
    make = loader_factory or eval_loader

    def loader_for(split):
        return lambda: make(shard_root, split, batch_size=cfg.batch_size, device=device, transform=transform,
                            channels=spec.in_channels, num_threads=num_threads)
    train = FinetuneLoader(build_labelled_index(shard_root, "train", train_patients), batch_size=cfg.batch_size,
                           cfg=cfg.augment, image_size=transform.image_size, channels=spec.in_channels, device=device,
                           seed=cfg.seed, num_threads=num_threads)
    val = ImageSource(loader_for("val"), cfg.max_images_in_memory)
    lrs, wds = grid if grid else ((cfg.lr,), (cfg.weight_decay,))
    runs = []
    for lr in lrs:
        for wd in wds:
            runs.append(train_one(spec, train, val, tasks, label_names, replace_cfg(cfg, lr=lr, weight_decay=wd),
                                  policy=policy, device=device, val_patients=val_patients, log=log))
    best = max(runs, key=lambda r: r.best_val_auroc if math.isfinite(r.best_val_auroc) else -math.inf)
    dev = torch_device(device)
    model, dim = build_encoder(spec)
    head = torch.nn.Linear(dim, len(tasks))
    model.load_state_dict(best.state["backbone"])
    head.load_state_dict(best.state["head"])
    model, head = model.to(dev).to(memory_format=torch.channels_last), head.to(dev)
    scores, raw, pids = [], [], []
    model.eval()
    with torch.no_grad(), autocast_context(resolve_precision("auto", dev), dev):
        for images, lbl, pid in iterate_valid(loader_for("test")()):
            x = images.to(dev).contiguous(memory_format=torch.channels_last)
            scores.append(torch.sigmoid(head(model(x)).float()).cpu().numpy())
            raw.append(lbl.float().cpu().numpy())
            pids.append(pid.cpu().numpy().astype(np.int64))
    scores, targets = np.concatenate(scores), select_targets(np.concatenate(raw), label_names, tasks, policy)
    result = evaluate(targets, scores, tasks).to_dict()
    n = len(train.index)
    if n // cfg.batch_size + (n % cfg.batch_size >= 2) == 0:
        result["notes"].append(f"training set of {n} image(s) cannot make a BatchNorm step (needs 2+ per batch): "
                               f"the encoder was not fine-tuned, the test scores are its untrained head's")
    counts = split_counts({"train": select_targets(train.index.raw_labels(), label_names, tasks, policy),
                           "val": select_targets(build_labelled_index(shard_root, "val", val_patients).raw_labels(),
                                                 label_names, tasks, policy), "test": targets}, tasks)
    for name, row in result["tasks"].items():
        row.update(counts[name])
    result.update(protocol="finetune", label_policy=policy.to_json(), uncertainty=policy.uncertain,
                  eval_view=transform.view, chosen_lr=best.lr, chosen_weight_decay=best.weight_decay,
                  best_epoch=best.best_epoch, best_val_mean_auroc=_num(best.best_val_auroc),
                  train_images=len(train.index), train_patients=int(len(np.unique(train.index.pid))),
                  val_in_memory=val.in_memory,
                  grid=[{"lr": r.lr, "weight_decay": r.weight_decay, "best_val_mean_auroc": _num(r.best_val_auroc),
                         "best_epoch": r.best_epoch, "history": r.history} for r in runs],
                  config=cfg.as_dict())
    return result, {"targets": targets, "scores": scores, "pids": np.concatenate(pids)}, best.state


def replace_cfg(cfg: FinetuneConfig, **kw) -> FinetuneConfig:
    return dataclasses.replace(cfg, **kw)
