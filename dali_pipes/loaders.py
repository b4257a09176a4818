"""Epoch-aware loaders around the DALI pipelines: pretraining (SimCLR / MICLe, exact resume) and evaluation."""
from __future__ import annotations

import base64
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dali_pipes import pipelines as P
from dali_pipes.augment import AugmentConfig, resolve_augment
from dali_pipes.sources import MicleSource, build_image_table
from dali_pipes.view_index import select_views
from ingest.schema import Manifest, ShardFormatError, load_manifest, parse_views, views_label


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


@dataclass(frozen=True)
class PretrainOptions:
    """Everything the pretraining loader needs besides the shard folder and split; the defaults live here only.
    ``views``: 'all', 'frontal' (drops LAT) or 'PA,AP,...' (``ingest.schema.parse_views``)."""
    batch_size: int                      # per rank
    device: str = "cpu"                  # DALI device: "cpu" or "gpu"
    augment: AugmentConfig | str = "simclr-cxr"
    micle: bool = False                  # same-patient pairs instead of two views of one image
    views: str | frozenset[str] = "frontal"
    image_size: int = 224
    channels: int = 1
    dtype: torch.dtype = torch.float32
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_threads: int = 2
    device_id: int | None = None         # None: torch's current CUDA device when device="gpu"
    prefetch: int = 2
    shuffle_buffer: int = 4096
    build_ahead: bool = True             # build the next epoch's pipeline in the background from mid-epoch


@dataclass(frozen=True)
class EvalOptions:
    """Everything the evaluation loader needs besides the shard folder and split; the defaults live here only.
    ``view``: "center" (resize shorter side to resize_size, centre crop) or "full" (whole film squashed to
    image_size; see ``pipelines.eval_view``)."""
    batch_size: int                      # per rank
    device: str = "cpu"
    image_size: int = 224
    resize_size: int = 256
    channels: int = 1
    dtype: torch.dtype = torch.float32
    rank: int = 0
    world_size: int = 1
    num_threads: int = 2
    device_id: int | None = None
    prefetch: int = 2
    view: str = "center"


@dataclass
class _EpochPipe:
    """One epoch's pipeline (and MICLe source), with the first batch's DALI outputs when it was run ahead."""
    epoch: int
    pipe: object
    source: MicleSource | None
    multi_instance_fraction: float = 0.0
    first: tuple | None = None

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


class PretrainLoader:
    """Iterate one epoch -> ``{"view1", "view2": (B, C, H, W) channels-last, "pids": (B,) int64}`` on the device
    (MICLe adds ``"multi_instance": (B,) bool``), every tensor owned by torch. ``state_dict`` is rank-local.

    Data path: SimCLR / MoCo always read through DALI's webdataset reader; a view selection reads a subset
    ``.idx`` over the same tars (``view_index``). MICLe reads its same-patient pairs from ``MicleSource``.

    Epoch ``e`` is one pipeline built from (seed, e, rank): the tar order is permuted globally (same on every rank)
    and the reader / augmentation RNGs are reseeded, so epoch ``e`` is reproducible without replaying epochs
    ``0..e-1``; the mid-epoch position is a DALI checkpoint. Why not one long-lived reader: its order would depend
    on every earlier epoch, and ``shuffle_after_epoch`` may shuffle differently with checkpointing on (DALI docs).
    The boundary does not stall: from the middle of an epoch on, the next epoch's pipeline is built and its first
    batch run in a background thread (``build_ahead``), so two pipelines coexist for half an epoch. Mid-epoch,
    not at the epoch's start: on a CPU-bound run the build's CPU time would otherwise land on the boundary step.
    """

    graph = staticmethod(P.pretrain_graph)  # the reader's graph (dali_pipes.multicrop swaps in its multi-crop one)

    def __init__(self, shard_root, split: str, options: PretrainOptions):
        self.options = o = options
        batch_size, device, augment, micle, views = o.batch_size, o.device, o.augment, o.micle, o.views
        image_size, channels, dtype, rank, world_size = o.image_size, o.channels, o.dtype, o.rank, o.world_size
        seed, num_threads, device_id, prefetch = o.seed, o.num_threads, o.device_id, o.prefetch
        shuffle_buffer, build_ahead = o.shuffle_buffer, o.build_ahead
        _check_rank(rank, world_size, batch_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 8 or shuffle_buffer < 1 or prefetch < 1 or num_threads < 1:
            raise ValueError(f"need image_size >= 8, shuffle_buffer, prefetch, num_threads >= 1 (got {image_size}, "
                             f"{shuffle_buffer}, {prefetch}, {num_threads})")
        self.cfg = resolve_augment(augment, channels)
        self.manifest, self.shards = _open_split(shard_root, split)
        self.split, self.batch_size, self.device = split, batch_size, device
        self.views = parse_views(views) if isinstance(views, str) else frozenset(views)
        self.micle, self.views_label = micle, views_label(self.views)
        self.image_size, self.channels, self.dtype = image_size, channels, dtype
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_threads, self.prefetch, self.shuffle_buffer = num_threads, prefetch, shuffle_buffer
        self._dali_dtype = P.dali_output_dtype(dtype)
        self._device_id, self.torch_device = P.resolve_device(device, device_id)
        self.num_samples = sum(s.num_samples for s in self.shards)
        if micle:  # patient groups: the .json / .pid of every image scanned once (mmap, ~20 ms per 1k images)
            self._table = build_image_table(self.manifest, split, views=self.views)
            self._reader_shards = None
            usable = int(self._table.usable.sum())
        else:
            self._table = None
            selection = select_views(self.manifest, split, self.views)
            self._reader_shards = selection.shards
            usable = selection.num_selected
        self.data_path = "MICLe pairs" if micle else "webdataset reader"
        self.num_usable = usable
        # Every rank runs the same number of steps: DALI gives rank r floor((r+1)N/W) - floor(rN/W) samples, the
        # smallest being floor(N/W); drop-last then keeps floor(N / (W*B)) full batches.
        self._len = usable // (world_size * batch_size)
        if self._len == 0:
            removed = self.num_samples - usable
            why = (f"the view filter views={self.views_label} removed {removed:,} of {self.num_samples:,} images; "
                   if removed else "")
            raise ValueError(f"{self.manifest.root / split}: {why}{usable:,} usable samples cannot fill one batch of "
                             f"{batch_size} per rank on {world_size} rank(s)")
        self.epoch = 0
        self._batches_done = 0
        self._current: _EpochPipe | None = None
        self._restore: str | None = None
        self._build_ahead = build_ahead
        self._ahead: tuple[int, Future] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._handoff = P.Handoff(self.torch_device)
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
                "seed": self.seed, "micle": self.micle, "views": self.views_label, "num_samples": self.num_samples,
                "num_usable": self.num_usable, "image_size": self.image_size, "channels": self.channels,
                "augment": repr(self.cfg), "shuffle_buffer": self.shuffle_buffer, "device": self.device}

    def state_dict(self) -> dict:
        """Position for exact resume: epoch, batches consumed in it, and the DALI checkpoint (RNG + reader state)."""
        if self._current is not None and self._batches_done:
            # DALI returns serialized protobuf bytes; base64 text survives JSON and torch.load(weights_only=True).
            dali = base64.b64encode(bytes(self._current.pipe.checkpoint())).decode("ascii")
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
        if self._current is not None:
            self._current.close()
            self._current = None

    def _build(self, epoch: int, restore: str | None) -> _EpochPipe:
        common = dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
                      seed=P.seed_for(self.seed, epoch, self.rank, 1), prefetch=self.prefetch,
                      checkpoint=base64.b64decode(restore) if restore else None, cfg=self.cfg,
                      image_size=self.image_size, channels=self.channels, dali_dtype=self._dali_dtype,
                      device=self.device)
        if self.micle:
            source = MicleSource(self._table, batch_size=self.batch_size, rank=self.rank, world_size=self.world_size,
                                 seed=self.seed, epoch=epoch)
            return _EpochPipe(epoch, P.build_pipeline(P.micle_graph, source=source, **common), source,
                              source.multi_instance_fraction())
        # Same permutation on every rank (seeded by seed, epoch only): ranks then split one global order.
        shards = self._reader_shards
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(len(shards))
        pipe = P.build_pipeline(
            self.graph, paths=[str(shards[i].tar) for i in order],
            index_paths=[str(shards[i].index) for i in order], rank=self.rank, world_size=self.world_size,
            reader_seed=P.seed_for(self.seed, epoch, self.rank, 2), shuffle_buffer=self.shuffle_buffer, **common)
        return _EpochPipe(epoch, pipe, None)

    def _build_and_run_first(self, epoch: int) -> _EpochPipe:
        ep = self._build(epoch, None)
        ep.first = ep.pipe.run()
        return ep

    def _start_ahead(self, epoch: int) -> None:
        if not self._build_ahead or self._ahead is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-build-ahead")
        self._ahead = (epoch, self._executor.submit(self._build_and_run_first, epoch))

    def _take_ahead(self) -> _EpochPipe | None:
        """The pipeline built ahead, if it is the one this position needs; any other is dropped."""
        if self._ahead is not None and self._ahead[0] == self.epoch and not self._batches_done and not self._restore:
            fut, self._ahead = self._ahead[1], None
            return fut.result()  # a build error surfaces here, in the loop's thread
        self._discard_ahead()
        return None

    def _discard_ahead(self) -> None:
        if self._ahead is None:
            return
        fut, self._ahead = self._ahead[1], None
        if not fut.cancel():
            try:
                fut.result().close()
            except Exception:  # a pipeline nobody will read: its error does not concern this run
                pass

    def close(self) -> None:
        """Release the pipelines (also the one built ahead), the held DALI buffers and the build thread."""
        self._release()
        self._discard_ahead()
        self._handoff.drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _to_torch(self, outs) -> dict:
        h = self._handoff
        batch = {"view1": h.images(outs[0], self.dtype), "view2": h.images(outs[1], self.dtype),
                 "pids": h.array(outs[2]).reshape(-1)}
        if self.micle:  # (B,) True where view2 comes from another image of the patient
            batch["multi_instance"] = h.array(outs[3]).reshape(-1).bool()
        h.commit()
        return batch

    def __iter__(self):
        if self._current is None:
            self._current = self._take_ahead() or self._build(self.epoch, self._restore)
            self.multi_instance_fraction = self._current.multi_instance_fraction
        cur = self._current
        while self._batches_done < self._len:
            if cur.first is not None:  # run ahead with the build
                outs, cur.first = cur.first, None
            else:
                outs = cur.pipe.run()
            batch = self._to_torch(outs)
            del outs
            self._batches_done += 1
            if self._batches_done >= max(1, self._len // 2):  # mid-epoch: away from this epoch's own start-up
                self._start_ahead(self.epoch + 1)
            yield batch
            if self._current is not cur:  # set_epoch / load_state_dict during iteration: stop this pass
                return
        # Epoch done (the rest of the shard is dropped): the next pass is the next epoch unless set_epoch says so.
        self._current = None
        if self._executor is not None:  # tear the pipeline down off the loop's thread (it joins DALI's workers)
            self._executor.submit(cur.close)
        else:
            cur.close()
        del cur
        self.epoch, self._batches_done, self._restore = self.epoch + 1, 0, None


class EvalLoader:
    """Iterate once over a split -> ``{"images", "labels" (B, L), "pids" (B,), "valid" (B,) bool}``.

    Every rank runs the same number of batches; ``valid`` is False on padding, so summing over valid rows of all
    ranks counts each sample exactly once.
    """

    def __init__(self, shard_root, split: str, options: EvalOptions):
        self.options = o = options
        batch_size, device, image_size, resize_size, channels = (o.batch_size, o.device, o.image_size, o.resize_size,
                                                                 o.channels)
        dtype, rank, world_size, num_threads, device_id = o.dtype, o.rank, o.world_size, o.num_threads, o.device_id
        prefetch, view = o.prefetch, o.view
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


def build_pretrain_loader(shard_root, split: str = "train", **options) -> PretrainLoader:
    """Two-view pretraining loader (SimCLR, or MICLe pairs with ``micle=True``); drop-last, reseeded per epoch.
    ``options``: the fields of ``PretrainOptions``."""
    return PretrainLoader(shard_root, split, PretrainOptions(**options))


def build_eval_loader(shard_root, split: str, **options) -> EvalLoader:
    """Deterministic single-view loader with labels, pids and a ``valid`` mask; no shuffle, every sample once.
    ``options``: the fields of ``EvalOptions``."""
    return EvalLoader(shard_root, split, EvalOptions(**options))
