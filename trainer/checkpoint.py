"""Checkpoints (atomic `RUN/ckpt/step-000500.pt`, keep last k, `torch.load(weights_only=True)`) and encoder.pt
export (read back by `trainer.encoder_io`).

A checkpoint holds only tensors, dicts, lists, numbers and strings: model, optimiser, scaler, step, epoch, per-rank
RNG states and data-loader positions (the MoCo queue is a model buffer).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ingest.errors import one_line
from ingest.files import atomic_write
CKPT_DIR = "ckpt"
_STEP_RE = re.compile(r"^step-(\d{6,})\.pt$")


def ckpt_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:06d}.pt"


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a ``step-000500.pt`` file name; None for any other name."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints in step order (temporary files of an interrupted write are not listed)."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save through ``ingest.files.atomic_write`` (temp file, fsync, rename, fsync the folder): never a torn
    file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Write ``step-{step:06d}.pt`` atomically, then delete all but the newest ``keep_last``."""
    path = atomic_save(state, ckpt_path(run_dir, step))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint not found") from None
    except Exception as e:
        reason = one_line(e, limit_chars=120, with_type=True)  # a zero-byte file: EOFError with no message
        raise ValueError(f"{path}: not a readable checkpoint ({reason})") from None


def to_plain(obj):
    """Make a state (e.g. a data loader's) weights_only-safe: numpy arrays -> tensors, tuples -> lists."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": to_plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].cpu().numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"].cpu())  # generators take CPU byte tensors, whatever map_location did
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ----------------------------------------------------------------------------------------------- encoder export


def save_encoder(path: str | Path, backbone: nn.Module, arch: str, in_channels: int, extra: dict | None = None) -> Path:
    """``RUN/encoder.pt``: {"arch", "in_channels", "feature_dim", "state_dict" (torchvision names, no fc.*),
    "config", "step"} -> loads into ``torchvision.models.<arch>()`` (stem adapted) missing only fc.weight/fc.bias."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    feature_dim = _feature_dim(state)
    doc = {"format": "cxr-ssl-encoder/1", "arch": arch, "in_channels": int(in_channels), "feature_dim": feature_dim,
           "state_dict": state, "config": {}, "step": 0}
    doc.update(extra or {})
    return atomic_save(doc, path)


def _feature_dim(state: dict) -> int:
    if "cls_token" in state:  # a ViT: its features are the CLS token
        return int(state["cls_token"].shape[-1])
    last_bn = [k for k in state if k.startswith("layer4.") and k.endswith(".running_mean")]
    return int(state[sorted(last_bn)[-1]].shape[0]) if last_bn else 0
