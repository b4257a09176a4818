"""Which NT-Xent implementation serves a run (`loss.impl`): the one place that resolves the name, checks the fused
Triton kernel against the reference on the run's first real embeddings, and keeps that decision for the run.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainer.losses import nt_xent_reference

IMPLS = ("auto", "reference", "fused")
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


class LossImpl:
    """`loss.impl` for one run, called like `nt_xent_reference` (same arguments and contract).

    'reference' and 'fused' run as asked ('fused' fails loudly where the kernels cannot run). 'auto' runs the
    reference unless the fused kernels can run here (a CUDA device, triton, embeddings up to the kernels' width);
    then the first call (the run's first step) computes both on its real embeddings, and the fused kernel serves
    the run only if loss and gradients agree within CHECK_LOSS_RTOL / CHECK_GRAD_RTOL. Any exception or mismatch
    keeps the reference, with one line saying why (`announce`, print by default; `log_fields()` for metrics.jsonl).
    Ranks agree on the outcome (one all-reduce at the check), so every rank gathers and computes the same way.
    """

    def __init__(self, requested: str = "auto", announce: Callable[[str], None] | None = None):
        if requested not in IMPLS:
            raise ValueError(f"unknown loss impl {requested!r} (choose from {', '.join(IMPLS)})")
        self.requested = requested
        self.active = None if requested == "auto" else requested  # None: auto, not decided yet
        self.note = ""  # why `active` was chosen (auto only)
        self._announce = announce or (lambda line: print(line, flush=True))
        self._note_logged = False

    def __repr__(self) -> str:
        return f"LossImpl(requested={self.requested!r}, active={self.active!r})"

    # ---- what the caller asks before computing its embeddings

    def eligible(self, device: torch.device | str, dim: int) -> tuple[bool, str]:
        """(whether the fused kernels may serve embeddings of width ``dim`` on ``device``, the reason if not)."""
        import os

        from trainer.fused_ntxent import fused_available
        device = torch.device(device)
        if device.type != "cuda":
            return False, f"tensors on {device.type}: the fused kernels run on CUDA"
        # the interpreter would be correct but ~1000x slower than the reference
        if os.environ.get("TRITON_INTERPRET") == "1":
            return False, "TRITON_INTERPRET=1"
        if not fused_available(device):
            return False, "triton or a CUDA device is missing"
        from trainer.fused_ntxent_kernels import MAX_DIM
        if dim > MAX_DIM:
            return False, f"embedding width {dim} > the kernels' {MAX_DIM}"
        return True, ""

    def wants_16bit(self, device: torch.device | str, dim: int) -> bool:
        """Whether autocast's 16-bit embeddings should stay 16-bit: the fused kernel runs them on tensor cores (and
        the gather moves half the bytes); the reference computes in fp32 either way."""
        if self.requested == "reference" or self.active == "reference":
            return False
        return self.requested == "fused" or self.eligible(device, dim)[0]

    # ---- the loss

    def __call__(self, z_rows, z_cols, row_labels, col_labels, row_offset: int, temperature: float,
                 reduction: str = "sum") -> torch.Tensor:
        impl = self.active
        if impl is None:
            impl = self._decide(z_rows, z_cols, row_labels, col_labels, row_offset, temperature)
        if impl == "fused":
            from trainer.fused_ntxent import nt_xent_fused
            return nt_xent_fused(z_rows, z_cols, row_labels, col_labels, row_offset, temperature, reduction)
        return nt_xent_reference(z_rows, z_cols, row_labels, col_labels, row_offset, temperature, reduction)

    def log_fields(self) -> dict:
        """For a metrics row: the implementation in use, and the reason once (the first row after the decision)."""
        fields = {"loss_impl": self.active or "undecided"}
        if self.note and not self._note_logged:
            fields["loss_impl_note"] = self.note
            self._note_logged = True
        return fields

    # ---- the self-check

    def _decide(self, z_rows, z_cols, row_labels, col_labels, row_offset, temperature) -> str:
        ok, why = self.eligible(z_rows.device, z_rows.shape[1])
        if not ok:
            self.active, self.note = "reference", f"loss.impl=auto: reference NT-Xent ({why})"
            return "reference"
        ok, why = self.compare(z_rows, z_cols, row_labels, col_labels, row_offset, temperature)
        from trainer.distributed import any_rank, world
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
            from trainer.fused_ntxent import nt_xent_fused
            fused = nt_xent_fused(rows, cols, *args, reduction="sum")
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
