"""Self-supervised methods, one class each behind the `Method` interface; `METHODS` maps loss.method to the class.

A new method is one module here with a `Method` subclass and one line in `METHODS`.
"""
from __future__ import annotations

from trainer.methods.base import Method
from trainer.methods.dino import DINO
from trainer.methods.micle import MICLe
from trainer.methods.moco import MoCoV2
from trainer.methods.simclr import SimCLR

METHODS: dict[str, type[Method]] = {"simclr": SimCLR, "moco": MoCoV2, "micle": MICLe, "dino": DINO}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"loss.method={name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(loss_cfg, *, device=None, embed_dim: int | None = None) -> Method:
    """The run's method object for a `LossConfig` (holds per-run state such as the chosen NT-Xent); ``device`` and
    ``embed_dim`` (the projections' width), where known, let it decide what depends on them at construction."""
    return method_class(loss_cfg.method)(loss_cfg, device=device, embed_dim=embed_dim)


__all__ = ["DINO", "METHODS", "Method", "MICLe", "MoCoV2", "SimCLR", "build_method", "method_class"]
