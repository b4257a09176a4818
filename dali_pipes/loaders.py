"""Epoch-aware loaders around the DALI pipelines: pretraining (SimCLR / MICLe, exact resume) and evaluation."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import torch

from dali_pipes import pipelines as P
from dali_pipes.augment import AugmentConfig, resolve_augment
from dali_pipes.sources import MicleSource, build_image_table
from ingest.schema import Manifest, ShardFormatError, load_manifest


def _open_split(shard_root, split: str) -> tuple[Manifest, list]:
    manifest = load_manifest(shard_root)  # raises ShardFormatError: missing folder / manifest / index / version
    shards = [s for s in manifest.shards(split) if s.num_samples > 0]
    if not shards:
        raise ShardFormatError(f"{Path(shard_root) / split}: split '{split}' has no samples")
    return manifest, shards


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class PretrainLoader:
    """Iterate one epoch -> ``{"view1", "view2": (B, C, H, W) channels-last, "pids": (B,) int64}`` on the device
    (MICLe adds ``"multi_instance": (B,) bool``). ``state_dict`` is rank-local: save one per rank.

    One pipeline per epoch, built from (seed, epoch, rank): the tar order is permuted globally (same on every rank)
    and the reader / augmentation RNGs are reseeded, so epoch ``e`` is reproducible without replaying epochs
    ``0..e-1``; the mid-epoch position is a DALI checkpoint. Why rebuild: a long-lived webdataset reader does redraw
    its shuffle buffer every epoch and (without ``stick_to_shard``) moves each rank to the next data shard, but the
    order then depends on every earlier epoch, and ``shuffle_after_epoch`` may shuffle differently with
    checkpointing on (DALI docs). A rebuild costs ~0.55 s build + ~0.13 s first batch on the 2-core CI box at 224 px.
    """

    def __init__(self, shard_root, split: str, *, batch_size: int, device: str, augment: AugmentConfig | str,
                 micle: bool, frontal_only: bool, image_size: int, channels: int, dtype: torch.dtype, rank: int,
                 world_size: int, seed: int, num_threads: int, device_id: int | None, prefetch: int,
                 shuffle_buffer: int):
        _check_rank(rank, world_size, batch_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 8 or shuffle_buffer < 1 or prefetch < 1 or num_threads < 1:
            raise ValueError(f"need image_size >= 8, shuffle_buffer, prefetch, num_threads >= 1 (got {image_size}, "
                             f"{shuffle_buffer}, {prefetch}, {num_threads})")
        self.cfg = resolve_augment(augment, channels)
        self.manifest, self.shards = _open_split(shard_root, split)
        self.split, self.batch_size, self.device = split, batch_size, device
        self.micle, self.frontal_only = micle, frontal_only
        self.image_size, self.channels, self.dtype = image_size, channels, dtype
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_threads, self.prefetch, self.shuffle_buffer = num_threads, prefetch, shuffle_buffer
        self._dali_dtype = P.dali_output_dtype(dtype)
        self._device_id, self.torch_device = P.resolve_device(device, device_id)
        self.num_samples = sum(s.num_samples for s in self.shards)
        # The .json views are scanned once (mmap, ~20 ms per 1k images) for MICLe's patient groups, and for the
        # frontal filter. SimCLR uses the webdataset reader (no Python per batch) unless the filter removes images;
        # then the same indexed external source as MICLe serves single images.
        table = build_image_table(self.manifest, split, frontal_only=frontal_only) if micle or frontal_only else None
        self._use_reader = not micle and (table is None or bool(table.usable.all()))
        self._table = None if self._use_reader else table
        usable = self.num_samples if self._use_reader else int(table.usable.sum())
        self.num_usable = usable
        # Every rank runs the same number of steps: DALI gives rank r floor((r+1)N/W) - floor(rN/W) samples, the
        # smallest being floor(N/W); drop-last then keeps floor(N / (W*B)) full batches.
        self._len = usable // (world_size * batch_size)
        if self._len == 0:
            raise ValueError(f"{self.manifest.root / split}: {usable} usable samples cannot fill one batch of "
                             f"{batch_size} per rank on {world_size} rank(s)")
        self.epoch = 0
        self._batches_done = 0
        self._pipe = None
        self._source: MicleSource | None = None
        self._restore: str | None = None
        self.multi_instance_fraction = 0.0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch`` (reseeds tar order, shuffle buffer and augmentation). The current epoch keeps its
        position, so ``load_state_dict`` then ``set_epoch(saved_epoch)`` resumes mid-epoch as a trainer loop expects."""
        if epoch != self.epoch:
            self._release()
            self.epoch, self._batches_done, self._restore = int(epoch), 0, None

    def _fingerprint(self) -> dict:
        return {"split": self.split, "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "seed": self.seed, "micle": self.micle, "frontal_only": self.frontal_only,
                "num_samples": self.num_samples, "num_usable": self.num_usable, "image_size": self.image_size, "channels": self.channels,
                "augment": repr(self.cfg), "shuffle_buffer": self.shuffle_buffer, "device": self.device}

    def state_dict(self) -> dict:
        """Position for exact resume: epoch, batches consumed in it, and the DALI checkpoint (RNG + reader state)."""
        if self._pipe is not None and self._batches_done:
            # DALI returns serialized protobuf bytes; base64 text survives JSON and torch.load(weights_only=True).
            dali = base64.b64encode(bytes(self._pipe.checkpoint())).decode("ascii")
        else:
            dali = self._restore
        return {"epoch": self.epoch, "batches_done": self._batches_done, "dali_checkpoint": dali,
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine, theirs = self._fingerprint(), state.get("fingerprint", {})
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        if diff:
            raise ValueError(f"loader state does not match this loader (differs in {diff}); cannot resume exactly")
        self._release()
        self.epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
        self._restore = state.get("dali_checkpoint") if self._batches_done else None
        if self._batches_done >= self._len:  # saved right after the last batch of an epoch
            self.epoch, self._batches_done, self._restore = self.epoch + 1, 0, None
        elif self._batches_done and not self._restore:
            raise ValueError("loader state is mid-epoch but carries no DALI checkpoint")

    def _release(self) -> None:
        self._pipe = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def _build(self):
        common = dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
                      seed=P.seed_for(self.seed, self.epoch, self.rank, 1), prefetch=self.prefetch,
                      checkpoint=base64.b64decode(self._restore) if self._restore else None, cfg=self.cfg, image_size=self.image_size, channels=self.channels,
                      dali_dtype=self._dali_dtype, device=self.device)
        if not self._use_reader:
            self._source = MicleSource(self._table, batch_size=self.batch_size, rank=self.rank,
                                       world_size=self.world_size, seed=self.seed, epoch=self.epoch, pairs=self.micle)
            if not self.micle:
                return P.build_pipeline(P.indexed_graph, source=self._source, **common)
            self.multi_instance_fraction = self._source.multi_instance_fraction()
            return P.build_pipeline(P.micle_graph, source=self._source, **common)
        # Same permutation on every rank (seeded by seed, epoch only): ranks then split one global order.
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).permutation(len(self.shards))
        return P.build_pipeline(
            P.pretrain_graph, paths=[str(self.shards[i].path) for i in order],
            index_paths=[str(self.shards[i].index_path) for i in order], rank=self.rank, world_size=self.world_size,
            reader_seed=P.seed_for(self.seed, self.epoch, self.rank, 2), shuffle_buffer=self.shuffle_buffer, **common)

    def __iter__(self):
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        while self._batches_done < self._len:
            outs = pipe.run()
            batch = {"view1": P.images_to_torch(outs[0], self.dtype, self.torch_device),
                     "view2": P.images_to_torch(outs[1], self.dtype, self.torch_device),
                     "pids": P.array_to_torch(outs[2], self.torch_device).reshape(-1)}
            if self.micle:  # (B,) True where view2 comes from another image of the patient
                batch["multi_instance"] = P.array_to_torch(outs[3], self.torch_device).reshape(-1).bool()
            self._batches_done += 1
            yield batch
            if self._pipe is not pipe:  # set_epoch / load_state_dict during iteration: stop this pass
                return
        # Epoch done (the rest of the shard is dropped): the next pass is the next epoch unless set_epoch says so.
        self._release()
        self.epoch, self._batches_done, self._restore = self.epoch + 1, 0, None


class EvalLoader:
    """Iterate once over a split -> ``{"images", "labels" (B, L), "pids" (B,), "valid" (B,) bool}``.

    Every rank runs the same number of batches; ``valid`` is False on padding, so summing over valid rows of all
    ranks counts each sample exactly once.
    """

    def __init__(self, shard_root, split: str, *, batch_size: int, device: str, image_size: int, resize_size: int,
                 channels: int, dtype: torch.dtype, rank: int, world_size: int, num_threads: int,
                 device_id: int | None, prefetch: int = 2, view: str = "center"):
        _check_rank(rank, world_size, batch_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if view not in P.EVAL_VIEWS:
            raise ValueError(f"unknown eval view {view!r} (choose from {', '.join(P.EVAL_VIEWS)})")
        self.view = view
        if view == "center" and resize_size < image_size:
            raise ValueError(f"resize_size {resize_size} is smaller than the centre crop {image_size}")
        self.manifest, self.shards = _open_split(shard_root, split)
        self.label_names = self.manifest.label_names
        self.split, self.batch_size, self.device = split, batch_size, device
        self.image_size, self.resize_size, self.channels, self.dtype = image_size, resize_size, channels, dtype
        self.rank, self.world_size, self.num_threads, self.prefetch = rank, world_size, num_threads, prefetch
        self._dali_dtype = P.dali_output_dtype(dtype)
        self._device_id, self.torch_device = P.resolve_device(device, device_id)
        n = sum(s.num_samples for s in self.shards)
        self.num_samples = n
        # DALI's sharding: rank r reads samples [floor(rN/W), floor((r+1)N/W)) in stored order.
        bounds = [r * n // world_size for r in range(world_size + 1)]
        self.rank_counts = [bounds[r + 1] - bounds[r] for r in range(world_size)]
        self.num_valid = self.rank_counts[rank]
        self._len = -(-max(self.rank_counts) // batch_size)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        pipe = P.build_pipeline(
            P.eval_graph, batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
            seed=0, prefetch=self.prefetch, paths=[str(s.path) for s in self.shards],
            index_paths=[str(s.index_path) for s in self.shards], rank=self.rank, world_size=self.world_size,
            image_size=self.image_size, resize_size=self.resize_size, channels=self.channels,
            dali_dtype=self._dali_dtype, device=self.device, view=self.view)
        positions = torch.arange(self.batch_size)
        for b in range(self._len):
            images, labels, pids = pipe.run()
            valid = (positions + b * self.batch_size) < self.num_valid
            yield {"images": P.images_to_torch(images, self.dtype, self.torch_device),
                   "labels": P.array_to_torch(labels, self.torch_device),
                   "pids": P.array_to_torch(pids, self.torch_device).reshape(-1),
                   "valid": valid.to(self.torch_device)}


def build_pretrain_loader(shard_root, split: str = "train", *, batch_size: int, device: str = "cpu",
                          augment: AugmentConfig | str = "simclr-cxr", micle: bool = False, frontal_only: bool = True,
                          image_size: int = 224, channels: int = 1, dtype: torch.dtype = torch.float32, rank: int = 0,
                          world_size: int = 1, seed: int = 0, num_threads: int = 2, device_id: int | None = None,
                          prefetch: int = 2, shuffle_buffer: int = 4096) -> PretrainLoader:
    """Two-view pretraining loader (SimCLR, or MICLe pairs with ``micle=True``); drop-last, reseeded per epoch."""
    return PretrainLoader(shard_root, split, batch_size=batch_size, device=device, augment=augment, micle=micle,
                          frontal_only=frontal_only, image_size=image_size, channels=channels, dtype=dtype, rank=rank,
                          world_size=world_size, seed=seed, num_threads=num_threads, device_id=device_id,
                          prefetch=prefetch, shuffle_buffer=shuffle_buffer)


def build_eval_loader(shard_root, split: str, *, batch_size: int, device: str = "cpu", image_size: int = 224,
                      resize_size: int = 256, channels: int = 1, dtype: torch.dtype = torch.float32, rank: int = 0,
                      world_size: int = 1, num_threads: int = 2, device_id: int | None = None,
                      prefetch: int = 2, view: str = "center") -> EvalLoader:
    """Deterministic single-view loader with labels, pids and a ``valid`` mask; no shuffle, every sample once.
    ``view``: "center" (resize shorter side to resize_size, centre crop) or "full" (whole film squashed to
    image_size; see ``pipelines.eval_view``)."""
    return EvalLoader(shard_root, split, batch_size=batch_size, device=device, image_size=image_size,
                      resize_size=resize_size, channels=channels, dtype=dtype, rank=rank, world_size=world_size,
                      num_threads=num_threads, device_id=device_id, prefetch=prefetch, view=view)
