"""The trainer's view of the data: the DALI pretraining loader for shards, or a synthetic loader with the same API.

The synthetic source (random tensors, deterministic in (seed, epoch, batch, rank)) serves unit tests and
model-only benchmarks; it follows the `dali_pipes.PretrainLoader` contract (dict batches, len, set_epoch,
state_dict / load_state_dict).
"""
from __future__ import annotations

import functools

import torch

from ingest.errors import one_line
from trainer.methods import method_class


class SyntheticLoader:
    """``num_batches`` per epoch of {"view1", "view2": (B, C, H, W) channels-last, "pids": (B,) int64}."""

    def __init__(self, *, batch_size: int, num_batches: int = 64, image_size: int = 32, channels: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_patients: int = 0):
        self.batch_size, self.num_batches = batch_size, num_batches
        self.shape = (batch_size, channels, image_size, image_size)
        self.dtype, self.device = dtype, torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_patients = num_patients
        self.epoch, self.position = 0, 0
        self.multi_instance_fraction = 0.0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "synthetic":
            raise ValueError("loader state is not from a synthetic loader")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _batch(self, index: int) -> dict:
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index, self.rank)) & 0x7FFF_FFFF)
        v1 = torch.randn(self.shape, generator=g)
        v2 = v1 + 0.3 * torch.randn(self.shape, generator=g)  # a correlated "second view"
        if self.num_patients:
            pids = torch.randint(0, self.num_patients, (self.batch_size,), generator=g)
        else:
            base = (self.epoch * self.num_batches + index) * self.batch_size * self.world_size
            pids = torch.arange(self.batch_size) + base + self.rank * self.batch_size
        out = {"view1": v1, "view2": v2, "pids": pids.to(torch.int64)}
        for k in ("view1", "view2"):
            out[k] = out[k].to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        out["pids"] = out["pids"].to(self.device)
        return out

    def __iter__(self):
        while self.position < self.num_batches:
            batch = self._batch(self.position)
            self.position += 1
            yield batch


def local_shards(data_cfg) -> str:
    """data.shards as a local folder: an s3:// location is staged into data.shards_cache (each shard checked against
    the manifest's sha256; shards verified before are kept), a local folder is returned as it is. Concurrent ranks
    share the work through a lock on the cache folder."""
    from ingest.remote import is_remote
    if not is_remote(data_cfg.shards):
        return data_cfg.shards
    return _staged(data_cfg.shards, data_cfg.shards_cache)


@functools.cache
def _staged(location: str, cache: str) -> str:
    """Once per process: the loader and the monitor share one staging (and one manifest request)."""
    from ingest.remote import stage
    return str(stage(location, cache or None))


def build_loader(data_cfg, model_cfg, loss_cfg, *, augment, per_rank_batch: int, rank: int, world_size: int,
                 seed: int, device: torch.device, dtype: torch.dtype, build_ahead: bool = True):
    """The loader a run's config asks for (DALI on shards, or synthetic), producing per-rank batches.
    ``augment``: the dali_pipes.AugmentConfig (or preset name) of the pretraining views. ``build_ahead=False``
    builds each epoch's DALI pipeline at the boundary (benchmarks compare both)."""
    if data_cfg.source == "synthetic":
        return SyntheticLoader(batch_size=per_rank_batch, num_batches=data_cfg.synthetic_batches,
                               image_size=data_cfg.image_size, channels=model_cfg.in_channels, dtype=dtype,
                               device=device, rank=rank, world_size=world_size, seed=seed,
                               num_patients=data_cfg.synthetic_patients)
    try:
        from dali_pipes import PretrainLoader, PretrainOptions
        from dali_pipes.multicrop import MultiCropLoader
    except ImportError as e:
        raise RuntimeError(f"data.source=shards needs dali_pipes.PretrainLoader ({one_line(e)})") from None
    dali_device = data_cfg.device
    if dali_device == "auto":
        dali_device = "gpu" if device.type == "cuda" else "cpu"
    options = PretrainOptions(
        batch_size=per_rank_batch, device=dali_device, augment=augment, micle=method_class(loss_cfg.method).micle_pairs,
        views=data_cfg.views, image_size=data_cfg.image_size, channels=model_cfg.in_channels, dtype=dtype, rank=rank,
        world_size=world_size, seed=seed, num_threads=data_cfg.num_threads,
        device_id=device.index if dali_device == "gpu" else None, prefetch=data_cfg.prefetch,
        shuffle_buffer=data_cfg.shuffle_buffer or PretrainOptions.shuffle_buffer, build_ahead=build_ahead)
    loader_cls = MultiCropLoader if method_class(loss_cfg.method).multi_crop else PretrainLoader
    loader = loader_cls(local_shards(data_cfg), data_cfg.split, options)
    if rank == 0:
        print(f"data path: {loader.data_path} | views={loader.views_label}: {loader.num_usable:,} of "
              f"{loader.num_samples:,} images in {data_cfg.split} | {len(loader)} steps per epoch", flush=True)
    return loader
