"""Multi-crop pretraining (DINO): 2 global + N local augmented crops of each image from the same shards, reader and
augmentation graph as the two-view loader, handed off grouped by size: batch["global"] (2, B, C, G, G) and
batch["local"] (N, B, C, L, L), each one channels-last tensor per size.
"""
from __future__ import annotations

import dataclasses

import torch

from dali_pipes import pipelines as P
from dali_pipes.augment import AugmentConfig, augment_view
from dali_pipes.loaders import PretrainLoader, PretrainOptions

GLOBAL_CROPS = 2


def local_config(cfg: AugmentConfig) -> AugmentConfig:
    """The local crops' augmentation: the global one with the local area range."""
    return dataclasses.replace(cfg, crop_scale_min=cfg.local_crop_scale_min, crop_scale_max=cfg.local_crop_scale_max)


def multicrop_graph(*, paths, index_paths, rank, world_size, reader_seed, shuffle_buffer, cfg: AugmentConfig,
                    image_size, channels, dali_dtype, device):
    """GLOBAL_CROPS crops at image_size then cfg.local_crops at cfg.local_crop_size of each decoded image (each an
    independent draw of the same graph), then the patient id."""
    from nvidia.dali import fn, types
    jpg, pid = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "pid"], dtypes=[types.UINT8, types.INT64],
        shard_id=rank, num_shards=world_size, random_shuffle=True, initial_fill=shuffle_buffer, seed=reader_seed,
        pad_last_batch=False, stick_to_shard=True, missing_component_behavior="error", name=P.READER_NAME)
    images = P.decode(jpg, device)
    kw = dict(channels=channels, dali_dtype=dali_dtype, device=device)
    local = local_config(cfg)
    crops = [augment_view(images, cfg, image_size=image_size, **kw) for _ in range(GLOBAL_CROPS)]
    crops += [augment_view(images, local, image_size=cfg.local_crop_size, **kw) for _ in range(cfg.local_crops)]
    return (*crops, P.on_device(pid, device))


class MultiCropLoader(PretrainLoader):
    """`PretrainLoader` (same shards, view selection, epochs, exact resume, build-ahead) whose batches are
    ``{"global": (2, B, C, S, S), "local": (N, B, C, L, L), "pids": (B,)}``; each crop slice is channels-last, and
    ``t.flatten(0, 1)`` is the (2B, C, S, S) batch a model takes, without a copy. N = 0 gives an empty "local"."""

    graph = staticmethod(multicrop_graph)

    def __init__(self, shard_root, split: str, options: PretrainOptions):
        if options.micle:
            raise ValueError("multi-crop reads one image per sample (MICLe pairs are a two-view method)")
        super().__init__(shard_root, split, options)
        self.local_crops, self.local_size = self.cfg.local_crops, self.cfg.local_crop_size
        self.data_path = f"webdataset reader, multi-crop {GLOBAL_CROPS}x{self.image_size}px + " \
                         f"{self.local_crops}x{self.local_size}px"

    def _stack(self, n: int, size: int) -> torch.Tensor:
        """(n, B, C, size, size) whose slices are channels-last (memory (n, B, H, W, C))."""
        mem = torch.empty((n, self.batch_size, size, size, self.channels), dtype=self.dtype, device=self.torch_device)
        return mem.permute(0, 1, 4, 2, 3)

    def _to_torch(self, outs) -> dict:
        h = self._handoff
        g, l = self._stack(GLOBAL_CROPS, self.image_size), self._stack(self.local_crops, self.local_size)
        for i in range(GLOBAL_CROPS):
            h.images(outs[i], self.dtype, out=g[i])
        for i in range(self.local_crops):
            h.images(outs[GLOBAL_CROPS + i], self.dtype, out=l[i])
        batch = {"global": g, "local": l, "pids": h.array(outs[-1]).reshape(-1)}
        h.commit()
        return batch


def build_multicrop_loader(shard_root, split: str = "train", **options) -> MultiCropLoader:
    """Multi-crop pretraining loader; ``options``: the fields of ``PretrainOptions`` (the crops come from
    ``augment``: an AugmentConfig or preset name, e.g. "dino-cxr")."""
    return MultiCropLoader(shard_root, split, PretrainOptions(**options))
