"""The run's NT-Xent as one module (`loss.impl`, temperature, positives, gather): decides once whether the fused Triton
kernel or the PyTorch reference serves the run, checks the fused kernel on the first step's real embeddings under
`auto`, and computes the global loss over every rank's batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import fused_ntxent
from trainer.distributed import any_rank, gather_no_grad, gather_with_grad, world
from trainer.losses import nt_xent_reference

IMPLS = ("auto", "reference", "fused")
POSITIVES = ("sample", "patient")
# The self-check's limits: relative L2 error (||fused - reference|| / ||reference||) on the same inputs. Both sides
# accumulate in fp32; the fused gradients come back in the input dtype (bf16 rounding alone is ~4e-3) and tf32 /
# 16-bit dots sum in another order. The kernel tests pass at 1e-2 for 16-bit and tf32 inputs, 1e-5 for exact fp32.
CHECK_LOSS_RTOL = 1e-3
CHECK_GRAD_RTOL = 2e-2
# The check compares at most this many rows (against every column): the reference's (rows, C) logits must fit
# beside the run even when the batch is large enough that only the fused kernel fits it.
CHECK_MAX_ROWS = 1024


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


class NTXent(nn.Module):
    """Global NT-Xent over every rank's batch; ``forward(z1, z2, pids)`` returns this rank's share times world_size.

    Implementation (``impl``): 'reference' and 'fused' run as asked ('fused' fails loudly where the kernels cannot
    run; `refusal` says so in one line once the device is known). 'auto' runs the reference unless the fused kernels
    can run here (a CUDA device, triton, embeddings up to the kernels' width); then the first call (the run's first
    step) computes both on its real embeddings, and the fused kernel serves the run only if loss and gradients agree
    within CHECK_LOSS_RTOL / CHECK_GRAD_RTOL. Any exception or mismatch keeps the reference, with one line saying why
    (``announce``, print by default; `log_fields()` for metrics.jsonl). Ranks agree on the outcome (one all-reduce at
    the check), so every rank gathers and computes the same way. What can be decided before the first step (device,
    triton, width) is decided by `place`, at construction when ``device`` is given.
    """

    def __init__(self, impl: str = "auto", temperature: float = 0.1, positives: str = "sample", gather: bool = True,
                 *, device: torch.device | str | None = None, dim: int | None = None,
                 announce: Callable[[str], None] | None = None):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown loss impl {impl!r} (choose from {', '.join(IMPLS)})")
        if positives not in POSITIVES:
            raise ValueError(f"unknown positives {positives!r}")
        self.requested, self.temperature, self.positives, self.gather = impl, float(temperature), positives, gather
        self.active = None if impl == "auto" else impl  # None: auto, not decided yet
        self.note = ""     # why `active` was chosen (auto only)
        self.refusal = ""  # why loss.impl=fused cannot run on the placed device ('' if it can)
        self._announce = announce or (lambda line: print(line, flush=True))
        self._note_logged = False
        self._placed: tuple | None = None  # the (device, dim) `place` decided for
        if device is not None:
            self.place(device, dim)

    @classmethod
    def from_config(cls, loss_cfg, *, device: torch.device | str | None = None, dim: int | None = None,
                    announce: Callable[[str], None] | None = None) -> NTXent:
        """The run's NT-Xent from its [loss] section (`trainer.config.LossConfig`)."""
        return cls(loss_cfg.impl, loss_cfg.temperature, loss_cfg.positives, loss_cfg.gather, device=device, dim=dim,
                   announce=announce)

    def extra_repr(self) -> str:
        return (f"impl={self.requested!r}, active={self.active!r}, temperature={self.temperature}, "
                f"positives={self.positives!r}, gather={self.gather}")

    # ---- which implementation may serve: decided here and in the first step's self-check only

    @staticmethod
    def eligible(device: torch.device | str, dim: int | None) -> tuple[bool, str]:
        """(whether auto may try the fused kernels for embeddings of width ``dim`` on ``device``, the reason if not);
        ``dim`` None: not known yet (the first step checks its real width)."""
        import os

        device = torch.device(device)
        if device.type != "cuda":
            return False, f"tensors on {device.type}: the fused kernels run on CUDA"
        # the interpreter would be correct but ~1000x slower than the reference
        if os.environ.get("TRITON_INTERPRET") == "1":
            return False, "TRITON_INTERPRET=1"
        if not fused_ntxent.fused_available(device):
            return False, "triton or a CUDA device is missing"
        from trainer.fused_ntxent_kernels import MAX_DIM
        if dim is not None and dim > MAX_DIM:
            return False, f"embedding width {dim} > the kernels' {MAX_DIM}"
        return True, ""

    def place(self, device: torch.device | str, dim: int | None = None) -> str:
        """Decide what can be decided from where the loss runs (``device``, embedding width ``dim`` if known): auto
        falls back to the reference where the fused kernels are not eligible. Returns `refusal`: the one-line reason
        loss.impl=fused cannot run there ('' if it can, and for the other impls). Once per (device, dim)."""
        device = torch.device(device)
        if self._placed == (device, dim):
            return self.refusal
        self._placed = (device, dim)
        self.refusal = ""
        if self.requested == "fused" and not fused_ntxent.fused_available(device):
            self.refusal = (f"loss.impl=fused needs triton and a CUDA device (this run is on {device.type}); "
                            f"use loss.impl=auto or reference")
        elif self.requested == "auto" and self.active is None:
            ok, why = self.eligible(device, dim)
            if not ok:
                self.active, self.note = "reference", f"loss.impl=auto: reference NT-Xent ({why})"
        return self.refusal

    def wants_16bit(self, device: torch.device | str, dim: int) -> bool:
        """Whether autocast's 16-bit embeddings should stay 16-bit: the fused kernel runs them on tensor cores (and
        the gather moves half the bytes); the reference computes in fp32 either way."""
        if self.requested == "reference" or self.active == "reference":
            return False
        return self.requested == "fused" or self.eligible(device, dim)[0]

    def log_fields(self) -> dict:
        """For a metrics row: the implementation in use, and the reason once (the first row after the decision)."""
        fields = {"loss_impl": self.active or "undecided"}
        if self.note and not self._note_logged:
            fields["loss_impl_note"] = self.note
            self._note_logged = True
        return fields

    # ---- the loss

    def forward(
        self,
        z1: torch.Tensor,                 # (N, D) projections of view 1 on this rank (not normalised)
        z2: torch.Tensor,                 # (N, D) projections of view 2
        pids: torch.Tensor | None = None,  # (N,) int64 patient indices; needed for positives="patient"
    ) -> torch.Tensor:
        """Rows are [view1; view2] of this rank; columns are those of all ranks (gathered with gradient). The sum over
        rows is divided by the global count of rows with a positive, then multiplied by world_size, because DDP
        averages gradients over ranks: averaging these per-rank values gives the global mean loss and its exact
        gradient. Precision: the reference computes in fp32 (tf32 dots under torch's 'high' matmul precision); the
        fused kernel gets the unit vectors in the projections' dtype, so bf16 / fp16 autocast outputs run on 16-bit
        tensor cores (fp32 accumulation, within 1e-2 of the reference) and fp32 ones follow torch's matmul precision.
        """
        rank, world_size = world() if self.gather else (0, 1)
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D) fp32: the norm is not worth 16-bit error
        if z1.dtype in (torch.float16, torch.bfloat16) and self.wants_16bit(z.device, z.shape[1]):
            # fp32 would put the kernel on tf32 at best: half the tensor-core rate and twice the bytes of autocast's
            z = z.to(z1.dtype)  # also halves the all_gather
        if self.positives == "sample":
            ids = torch.arange(n, device=z.device) + rank * n  # globally unique per sample
        else:
            if pids is None:
                raise ValueError("positives='patient' needs the batch's patient ids")
            ids = pids.to(z.device, torch.int64)
        row_labels = torch.cat([ids, ids])  # (2N,)
        if world_size > 1:
            # Gather in [rank0 rows; rank1 rows; ...] order so this rank's rows start at rank * 2N.
            z_cols = gather_with_grad(z)  # (W*2N, D)
            col_labels = gather_no_grad(row_labels)  # (W*2N,)
        else:
            z_cols, col_labels = z, row_labels
        row_offset = rank * 2 * n
        loss_sum = self.loss_rows(z, z_cols, row_labels, col_labels, row_offset, reduction="sum")
        # Every row has a positive (its other view shares its label), so the global row count is W * 2N.
        global_rows = 2 * n * world_size
        return loss_sum * world_size / global_rows

    def loss_rows(self, z_rows, z_cols, row_labels, col_labels, row_offset: int,
                  reduction: str = "sum") -> torch.Tensor:
        """The serving implementation on explicit rows and columns: `nt_xent_reference`'s arguments and contract, at
        this module's temperature. Under auto the first call runs the self-check."""
        impl = self.active
        if impl is None:
            impl = self._decide(z_rows, z_cols, row_labels, col_labels, row_offset)
        if impl == "fused":
            return fused_ntxent.nt_xent_fused(z_rows, z_cols, row_labels, col_labels, row_offset, self.temperature,
                                              reduction)
        return nt_xent_reference(z_rows, z_cols, row_labels, col_labels, row_offset, self.temperature, reduction)

    # ---- the self-check

    def _decide(self, z_rows, z_cols, row_labels, col_labels, row_offset) -> str:
        ok, why = self.eligible(z_rows.device, z_rows.shape[1])
        if not ok:
            self.active, self.note = "reference", f"loss.impl=auto: reference NT-Xent ({why})"
            return "reference"
        ok, why = self.compare(z_rows, z_cols, row_labels, col_labels, row_offset, self.temperature)
        own_failure = not ok
        if any_rank(own_failure, z_rows.device) and ok:  # every rank calls the all-reduce
            ok, why = False, "another rank's check failed"
        if ok:
            self.active, self.note = "fused", f"loss.impl=auto: fused NT-Xent agrees with the reference on {why}"
        else:
            self.active = "reference"
            self.note = f"loss.impl=auto: falling back to the reference NT-Xent for this run: {why}"
        if world()[0] == 0 or own_failure:
            self._announce(self.note)
        return self.active

    @staticmethod
    def compare(z_rows, z_cols, row_labels, col_labels, row_offset, temperature) -> tuple[bool, str]:
        """Fused vs reference loss and gradients on these embeddings (the first CHECK_MAX_ROWS rows against every
        column) -> (agree, one-line description)."""
        n = min(z_rows.shape[0], CHECK_MAX_ROWS)
        shape = f"R={n} C={z_cols.shape[0]} D={z_rows.shape[1]} {str(z_rows.dtype).split('.')[-1]}"
        rows = z_rows[:n].detach().clone().requires_grad_()
        cols = z_cols.detach().clone().requires_grad_()
        args = (row_labels[:n], col_labels, row_offset, temperature)
        try:
            fused = fused_ntxent.nt_xent_fused(rows, cols, *args, reduction="sum")
            fused_grads = torch.autograd.grad(fused, (rows, cols))
            ref = nt_xent_reference(rows, cols, *args, reduction="sum")
            ref_grads = torch.autograd.grad(ref, (rows, cols))
            errors = {"loss": _rel(fused.detach(), ref.detach()), "d rows": _rel(fused_grads[0], ref_grads[0]),
                      "d cols": _rel(fused_grads[1], ref_grads[1])}  # .item() inside: kernel errors surface here
        except Exception as e:  # any failure of the never-run-here kernels keeps the run on the reference
            return False, f"the fused kernel raised {_first_line(e)} ({shape})"
        limits = {"loss": CHECK_LOSS_RTOL, "d rows": CHECK_GRAD_RTOL, "d cols": CHECK_GRAD_RTOL}
        summary = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        bad = [k for k, v in errors.items() if not v <= limits[k]]  # NaN counts as bad
        if bad:
            return False, (f"relative error of {', '.join(bad)} above {CHECK_LOSS_RTOL:.0e} (loss) / "
                           f"{CHECK_GRAD_RTOL:.0e} (gradients): {summary} ({shape})")
        return True, f"{shape}: relative error {summary}"
