"""Learning-rate schedules as pure functions of the step: batch scaling, linear warm-up, then cosine decay."""
from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int, rule: str = "linear") -> float:
    """Peak lr for ``global_batch`` images: SimCLR's linear rule base_lr * batch / 256, or base_lr * sqrt(batch)."""
    if rule == "linear":
        return base_lr * global_batch / 256.0
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def warmup_cosine(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """lr for the update made at ``step`` (0-based): linear ramp to ``peak_lr`` over ``warmup_steps``, then a
    half-cosine down to ``min_lr`` at ``total_steps``; ``min_lr`` after the end."""
    if total_steps <= 0:
        raise ValueError("total_steps must be > 0")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return min_lr if step >= total_steps else peak_lr
    progress = (step - warmup_steps) / decay_steps
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def steps_from_epochs(epochs: float, steps_per_epoch: int) -> int:
    return max(0, int(round(epochs * steps_per_epoch)))
