"""Fused NT-Xent: the loss of `trainer.losses.nt_xent_reference` as Triton kernels that never build the R x C logits.

Memory is O((R + C) x D); `trainer.ntxent.NTXent` decides whether it serves a run (loss.impl).
"""
from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean", "none")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_unavailable(device: torch.device | str) -> str:
    """Why the fused kernels cannot run on ``device`` ('' when they can: a CUDA GPU with triton, or the CPU under
    TRITON_INTERPRET=1 exported before Python starts)."""
    device = torch.device(device)
    if not triton_importable():
        return "loss.impl=fused needs triton (pip install triton)"
    if device.type == "cuda" and torch.cuda.is_available():
        return ""
    if device.type == "cpu":
        from trainer.fused_ntxent_kernels import interpreter_usable, interpreting
        if interpreter_usable():
            return ""
        if interpreting():
            return ("TRITON_INTERPRET=1 was set after triton was imported (importing torch imports it): "
                    "export it before Python starts to run the fused loss on the CPU")
    return (f"loss.impl=fused runs on a CUDA GPU (or on the CPU with TRITON_INTERPRET=1 exported "
            f"before Python starts); got tensors on {device}")


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``: a CUDA GPU with triton, or the CPU under TRITON_INTERPRET=1."""
    return not fused_unavailable(device)


def _require_fused(device: torch.device) -> None:
    reason = fused_unavailable(device)
    if reason:
        raise RuntimeError(f"{reason}; use loss.impl=reference or auto")


class _FusedNTXent(torch.autograd.Function):
    """Per-row NT-Xent (R,) fp32 and the per-row positive count (R,) (not differentiable)."""

    @staticmethod
    def forward(ctx, z_rows, z_cols, row_labels, col_labels, row_offset: int, temperature: float,
                bf16_grad_split: bool):
        from trainer import fused_ntxent_kernels as kernels
        loss, lse, cnt = kernels.forward(z_rows, z_cols, row_labels, col_labels, row_offset, temperature)
        ctx.save_for_backward(z_rows, z_cols, row_labels, col_labels, lse, cnt)
        ctx.row_offset, ctx.temperature, ctx.bf16_grad_split = row_offset, temperature, bf16_grad_split
        ctx.mark_non_differentiable(cnt)
        return loss, cnt

    @staticmethod
    def backward(ctx, grad_loss, _grad_cnt):
        from trainer import fused_ntxent_kernels as kernels
        z_rows, z_cols, row_labels, col_labels, lse, cnt = ctx.saved_tensors
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None or not (need_rows or need_cols):
            return None, None, None, None, None, None, None
        active = cnt > 0  # (R,)
        inv_pos = torch.where(active, 1.0 / cnt.clamp(min=1.0), torch.zeros_like(cnt))
        coef = torch.where(active, grad_loss.float() / ctx.temperature, torch.zeros_like(cnt))
        # normalise on device (no host sync): the kernels multiply the scale back in after the 16-bit matmul
        coef_scale = coef.abs().amax().reshape(1) if coef.numel() else torch.ones(1, device=coef.device)
        coef_scale = torch.where(coef_scale > 0, coef_scale, torch.ones_like(coef_scale))
        coef = (coef / coef_scale).contiguous()
        lse = torch.where(active, lse, torch.zeros_like(lse))  # inactive rows are masked; keep their exp finite
        dz_rows, dz_cols = kernels.backward(z_rows, z_cols, row_labels, col_labels, ctx.row_offset, ctx.temperature,
                                            lse, coef, inv_pos, coef_scale, need_rows, need_cols,
                                            split_bf16=ctx.bf16_grad_split)
        return dz_rows, dz_cols, None, None, None, None, None


def _check(z_rows, z_cols, row_labels, col_labels, row_offset, temperature, reduction) -> None:
    if z_rows.dim() != 2 or z_cols.dim() != 2 or z_rows.shape[1] != z_cols.shape[1]:
        raise ValueError(f"nt_xent: z_rows (R, D) and z_cols (C, D) must share D; got {tuple(z_rows.shape)} "
                         f"and {tuple(z_cols.shape)}")
    if row_labels.shape != (z_rows.shape[0],) or col_labels.shape != (z_cols.shape[0],):
        raise ValueError(f"nt_xent: labels must be (R,) and (C,); got {tuple(row_labels.shape)} and "
                         f"{tuple(col_labels.shape)} for R={z_rows.shape[0]}, C={z_cols.shape[0]}")
    if not 0 <= row_offset <= z_cols.shape[0] - z_rows.shape[0]:
        raise ValueError(f"nt_xent: row_offset {row_offset} puts rows 0..{z_rows.shape[0]} outside the "
                         f"{z_cols.shape[0]} columns")
    if not temperature > 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r} (choose from {', '.join(REDUCTIONS)})")
    if len({z_rows.device, z_cols.device, row_labels.device, col_labels.device}) != 1:
        raise ValueError("nt_xent: embeddings and labels must be on one device")


def _reduce(per_row: torch.Tensor, cnt: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (cnt > 0).sum().clamp(min=1)


def nt_xent_fused(
    z_rows: torch.Tensor,      # (R, D) this rank's rows (bf16 / fp16 / fp32)
    z_cols: torch.Tensor,      # (C, D) every rank's embeddings, gathered with gradient
    row_labels: torch.Tensor,  # (R,) int: positives share a label
    col_labels: torch.Tensor,  # (C,) int
    row_offset: int,           # column index of row 0 in z_cols
    temperature: float,
    reduction: str = "sum",
    bf16_grad_split: bool = True,
) -> torch.Tensor:
    """Same value and gradients as `nt_xent_reference`, computed by tiled Triton kernels (fp32 accumulation).

    Returns fp32 like the reference; gradients come back in the input dtype, for z_rows and for every z_cols row.
    ``bf16_grad_split=False`` rounds the backward's dS to bf16 once (flash-attention style): one matmul fewer per
    backward kernel, about 2x the gradient error of the split (still well inside 1e-2 relative).
    Speed: bf16 / fp16 inputs run on tensor cores. fp32 inputs follow torch's fp32 matmul precision like the
    reference's cuBLAS matmul: 'high' / 'medium' (the trainer's CUDA setting) -> tf32 tensor cores, 'highest'
    (torch's default) -> exact fp32 FMA, several times slower. The trainer hands bf16 / fp16 when autocast made them.
    """
    _check(z_rows, z_cols, row_labels, col_labels, row_offset, temperature, reduction)
    _require_fused(z_rows.device)
    if z_rows.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"nt_xent_fused: embeddings must be fp32, fp16 or bf16, got {z_rows.dtype}")
    dtype = torch.promote_types(z_rows.dtype, z_cols.dtype)
    if z_rows.shape[0] == 0 or z_cols.shape[0] == 0 or z_rows.shape[1] == 0:
        per_row = (z_rows.float().sum(1) + z_cols.float().sum() * 0.0) * 0.0  # (R,) zeros that keep the graph
        return _reduce(per_row, torch.zeros_like(per_row), reduction)
    from trainer.fused_ntxent_kernels import MAX_DIM
    if z_rows.shape[1] > MAX_DIM:
        raise ValueError(f"nt_xent_fused: embedding width {z_rows.shape[1]} > {MAX_DIM} is not supported; "
                         "use loss.impl=reference")
    per_row, cnt = _FusedNTXent.apply(
        z_rows.to(dtype).contiguous(), z_cols.to(dtype).contiguous(),
        row_labels.to(torch.int64).contiguous(), col_labels.to(torch.int64).contiguous(), int(row_offset),
        float(temperature), bool(bf16_grad_split))
    return _reduce(per_row, cnt, reduction)
