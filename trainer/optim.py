"""Optimisers: LARS (BatchNorm and bias parameters excluded from weight decay and trust-ratio scaling), SGD, AdamW."""
from __future__ import annotations

import torch
import torch.nn as nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as used by SimCLR.

    For a parameter p with gradient g (groups with ``lars_exclude`` skip both steps):
      g <- g + wd * p;  g <- g * (eta * ||p|| / ||g||)  when both norms are > 0;  v <- m * v + g;  p <- p - lr * v
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, lars_exclude: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        lars_exclude=lars_exclude)
        super().__init__(params, defaults)
        self.last_trust_ratios: torch.Tensor | None = None  # (P,) of the last step's adapted tensors (health metrics)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ratios = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # foreach kernels: a ResNet-50 has ~160 tensors, a per-tensor loop would launch ~10 kernels for each
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))  # (P,)
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((p_norm > 0) & (g_norm > 0), group["trust_coefficient"] * p_norm / g_norm,
                                    torch.ones_like(p_norm))
                grads = torch._foreach_mul(grads, list(trust.unbind(0)))
                ratios.append(trust)
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):
                bufs = [g.detach().clone() for g in grads]
                for p, b in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = b
            else:
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        self.last_trust_ratios = torch.cat(ratios) if ratios else None
        return loss


def is_excluded(name: str, param: torch.Tensor, module: nn.Module | None) -> bool:
    """BatchNorm/GroupNorm/LayerNorm parameters and all biases (1-D tensors) get no decay and no adaptation."""
    return param.ndim <= 1 or isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def param_groups(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """(regular params, excluded params, excluded names) over trainable parameters."""
    regular, excluded, excluded_names = [], [], []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if is_excluded(p_name, p, module):
                excluded.append(p)
                excluded_names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
            else:
                regular.append(p)
    return regular, excluded, excluded_names


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    """From the ``optim`` config section; ``lr`` is the scaled peak lr (the schedule sets it every step)."""
    regular, excluded, _ = param_groups(model)
    wd = optim_cfg.weight_decay
    if optim_cfg.name == "lars":
        return LARS([{"params": regular}, {"params": excluded, "weight_decay": 0.0, "lars_exclude": True}],
                    lr=lr, momentum=optim_cfg.momentum, weight_decay=wd,
                    trust_coefficient=optim_cfg.trust_coefficient)
    groups = [{"params": regular, "weight_decay": wd}, {"params": excluded, "weight_decay": 0.0}]
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=False)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas))
    raise ValueError(f"unknown optimiser {optim_cfg.name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
