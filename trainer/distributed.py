"""Process-group setup from the torchrun environment (NCCL on GPU, gloo on CPU) and gathers with gradient.

Gradient convention: every rank's loss is its share of the global loss scaled by world_size (a per-rank mean), DDP
averages parameter gradients over ranks, and `GatherWithGrad` sums the embedding gradients from every rank in
backward. Together they give exactly the single-process gradient of the global loss (tested under torchrun).
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun); init the process group when world_size > 1; pick the device.

    ``timeout_s`` bounds every collective (and the group's start-up): a rank whose peer died or hangs raises
    instead of waiting forever (see `peer_failure`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        _started[0] = True
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def used_process_group() -> bool:
    """Whether this process ever started a process group (its backend threads may outlive `teardown`)."""
    return _started[0]


_started = [False]


def exit_process(code: int) -> None:
    """End a rank's process with ``code``, skipping interpreter finalisation when it ran a process group.

    DistributedDataParallel keeps references to its process group that outlive both the DDP object and
    destroy_process_group, so gloo's worker and TCP-loop threads are still running at interpreter exit, and their
    C++ destructors, reached during finalisation, abort the process now and then ("terminate called without an
    active exception") after the run has finished cleanly. Everything the run writes is already closed (checkpoints
    fsynced, loggers closed, teardown done), so after flushing the streams the process ends without finalisation."""
    import sys

    if not used_process_group():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def peer_failure(e: BaseException) -> str | None:
    """One line when ``e`` is a collective that failed because a peer died, hung past the group's timeout or closed
    its connection; None for every other error (those keep their traceback)."""
    if not _started[0]:
        return None
    text = " ".join(str(e).split())
    markers = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe",
               "NCCL communicator was aborted", "Socket Timeout", "connection refused", "Connection refused")
    dist_error = isinstance(e, getattr(dist, "DistError", ()))
    if not dist_error and not (isinstance(e, RuntimeError) and any(m in text for m in markers)):
        return None
    text = re.sub(r"\[[^\]]*(third_party|\.cpp|\.cc)[^\]]*\]\s*", "", text)  # gloo's source locations
    text = text.split(" This is typically caused")[0]  # gloo's advice and emoji after the reason
    return text[:240]


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 in rank order; backward sums the gathered gradient over ranks and keeps this rank's slice.

    Each rank's loss depends on every rank's embeddings, so the gradient reaching embedding x_r is the sum over
    ranks of d loss_rank / d x_r: an all-reduce (sum), not this rank's local gradient alone.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))  # (world * rows, ...)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":  # sum over ranks, and each rank receives only its own slice
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(rows, ...) on each rank -> (world * rows, ...), differentiable; identity without a process group."""
    if world()[1] == 1:
        return x
    return GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather along dim 0 without gradient (labels, MoCo keys); identity without a process group."""
    world_size = world()[1]
    if world_size == 1:
        return x
    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity without a process group."""
    if world()[1] == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world()[1]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (a signal received by some of them)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_state(obj) -> list:
    """Every rank's ``obj`` (tensors, dicts, lists, numbers, strings) on every rank, in rank order.

    Serialised with torch.save / torch.load(weights_only=True) rather than pickle, so tensors travel safely."""
    if world()[1] == 1:
        return [obj]
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    out = [None] * world()[1]
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def broadcast_object(obj, src: int = 0):
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
