"""DALI graphs (pretrain, MICLe, eval, labelled fine-tuning) and the hand-off of DALI outputs into torch memory."""
from __future__ import annotations

import collections

import numpy as np
import torch

from dali_pipes.augment import AugmentConfig, augment_view, geometric, normalize, replicate_channels

READER_NAME = "reader"


def dali_output_dtype(dtype: torch.dtype):
    """DALI has no bfloat16 (2.4): bf16 is produced as fp16 by DALI and converted during the copy into torch."""
    from nvidia.dali import types
    table = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16}
    if dtype not in table:
        raise ValueError(f"unsupported output dtype {dtype} (choose torch.float32, torch.bfloat16 or torch.float16)")
    return table[dtype]


def resolve_device(device: str, device_id: int | None) -> tuple[int | None, torch.device]:
    """(DALI device_id, torch device) for ``device`` in {"cpu", "gpu"}; RuntimeError when a GPU is asked for and
    absent."""
    if device == "cpu":
        return None, torch.device("cpu")
    if device != "gpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("dali_pipes: device='gpu' was requested but no CUDA GPU is visible (use device='cpu')")
    if device_id is None:
        device_id = torch.cuda.current_device()
    return device_id, torch.device("cuda", device_id)


def seed_for(*parts: int) -> int:
    """A 31-bit seed derived from (seed, epoch, rank, stream tag ...) so streams never collide."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def decode(jpg, device: str):
    """Gray decode; ``gpu`` uses nvJPEG via ``decoders.image(device="mixed")``.

    Hardware decoder and single-channel JPEGs: DALI's decoder goes through nvImageCodec, whose hardware plugin
    (NVIDIA/nvImageCodec ``extensions/nvjpeg/hw_decoder.cpp``) lists ``NVIMGCODEC_SAMPLING_GRAY`` among its
    supported chroma subsamplings next to 4:4:4/4:2:2/4:2:0/4:4:0, then asks ``nvjpegDecodeBatchedSupportedEx``
    per image; the nvJPEG docs give hardware acceleration for *baseline* JPEG on A100/H100. ingest writes baseline
    8-bit gray JPEGs, so shards are eligible for the A100/H100 JPEG engines.
    """
    from nvidia.dali import fn, types
    if device == "gpu":
        # hw_decoder_load: share of each batch sent to the A100/H100 JPEG engine; the rest uses CUDA cores.
        return fn.decoders.image(jpg, device="mixed", output_type=types.GRAY, hw_decoder_load=0.65)
    return fn.decoders.image(jpg, device="cpu", output_type=types.GRAY)


def on_device(node, device: str):
    """Small per-sample outputs (pids, labels, flags) leave a gpu graph on the GPU: DALI copies them in its own
    stream order, so torch never reads a (possibly pinned, possibly recycled) host buffer behind DALI's back."""
    return node.gpu() if device == "gpu" else node


def pretrain_graph(*, paths, index_paths, rank, world_size, reader_seed, shuffle_buffer, cfg: AugmentConfig,
                   image_size, channels, dali_dtype, device):
    """Two augmented views of each sample read by the webdataset reader, plus its patient id."""
    from nvidia.dali import fn, types
    jpg, pid = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "pid"], dtypes=[types.UINT8, types.INT64],
        shard_id=rank, num_shards=world_size, random_shuffle=True, initial_fill=shuffle_buffer, seed=reader_seed,
        pad_last_batch=False, stick_to_shard=True, missing_component_behavior="error", name=READER_NAME)
    images = decode(jpg, device)
    kw = dict(image_size=image_size, channels=channels, dali_dtype=dali_dtype, device=device)
    return augment_view(images, cfg, **kw), augment_view(images, cfg, **kw), on_device(pid, device)


def micle_graph(*, source, cfg: AugmentConfig, image_size, channels, dali_dtype, device):
    """MICLe: view 1 from the anchor image, view 2 from its same-patient partner (the same augmentation graph)."""
    from nvidia.dali import fn, types
    jpg1, jpg2, pid, multi = fn.external_source(
        source=source, num_outputs=4, batch=True, batch_info=True,
        dtype=[types.UINT8, types.UINT8, types.INT64, types.UINT8], ndim=[1, 1, 1, 1])
    kw = dict(image_size=image_size, channels=channels, dali_dtype=dali_dtype, device=device)
    return (augment_view(decode(jpg1, device), cfg, **kw), augment_view(decode(jpg2, device), cfg, **kw),
            on_device(pid, device), on_device(multi, device))


EVAL_VIEWS = ("full", "center")


def eval_view(images, *, view: str, image_size: int, resize_size: int, device: str):
    """The deterministic eval geometry: ``full`` resizes the whole film to (image_size, image_size), aspect not kept
    (nothing cut: the costophrenic angles and apices stay); ``center`` resizes the shorter side to resize_size and
    centre-crops image_size (drops ~28 % of a portrait film's height at 256 -> 224)."""
    from nvidia.dali import fn, types
    if view == "full":
        return fn.resize(images, device=device, resize_x=image_size, resize_y=image_size,
                         interp_type=types.INTERP_LINEAR, antialias=True)
    if view != "center":
        raise ValueError(f"unknown eval view {view!r} (choose from {', '.join(EVAL_VIEWS)})")
    return geometric(images, image_size=image_size, resize_size=resize_size, device=device, cfg=None)


def eval_graph(*, paths, index_paths, rank, world_size, image_size, resize_size, channels, dali_dtype, device,
               view="center"):
    """One deterministic view (``eval_view``), labels and patient id."""
    from nvidia.dali import fn, types
    jpg, lbl, pid = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "lbl", "pid"], dtypes=[types.UINT8, types.FLOAT, types.INT64],
        shard_id=rank, num_shards=world_size, random_shuffle=False, pad_last_batch=True, stick_to_shard=True,
        missing_component_behavior="error", name=READER_NAME)
    x = eval_view(decode(jpg, device), view=view, image_size=image_size, resize_size=resize_size, device=device)
    if channels == 3:
        x = replicate_channels(x, device)
    return normalize(x, channels=channels, dali_dtype=dali_dtype, device=device), lbl, pid


def labelled_graph(*, source, cfg: AugmentConfig, image_size, channels, dali_dtype, device):
    """Fine-tuning: one augmented view (the pretraining augmentation graph) of each image from an external source
    of (jpg bytes, labels, pid), with its labels and patient id."""
    from nvidia.dali import fn, types
    jpg, lbl, pid = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                       dtype=[types.UINT8, types.FLOAT, types.INT64], ndim=[1, 1, 1])
    images = augment_view(decode(jpg, device), cfg, image_size=image_size, channels=channels, dali_dtype=dali_dtype,
                          device=device)
    return images, lbl, pid


def define_pipeline(graph_fn, *, batch_size, num_threads, device_id, seed, prefetch, checkpoint=None, **graph_kw):
    """A checkpointable DALI pipeline around ``graph_fn(**graph_kw)``, defined (arguments validated) but not built."""
    from nvidia.dali import pipeline_def

    # Conditionals: `if coin:` in the augmentation splits the batch so skipped samples skip the op entirely.
    @pipeline_def(enable_checkpointing=True, enable_conditionals=True)
    def _pipe():
        return graph_fn(**graph_kw)

    return _pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch, checkpoint=checkpoint, exec_dynamic=True)


def build_pipeline(graph_fn, **kw):
    pipe = define_pipeline(graph_fn, **kw)
    pipe.build()
    return pipe


class Handoff:
    """DALI outputs -> tensors that torch owns, before DALI may reuse the memory.

    Every output is copied into a fresh torch tensor on torch's current stream. ``torch.from_dlpack`` passes that
    stream to DALI's ``__dlpack__``, which orders it after DALI's producing work. On a GPU the copy is queued, not
    done, when this returns, so the DLPack views (each keeps its DALI buffer alive) are held in a ring until a
    CUDA event recorded after the copies has completed; no host sync. On the CPU the copy is done on return.
    Images: DALI's (B, H, W, C) is exactly the memory of a channels-last (B, C, H, W) tensor, so the copy is one
    contiguous pass (and converts fp16 -> bf16 on the way: DALI 2.4 has no bfloat16).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._pending: list[torch.Tensor] = []
        self._ring: collections.deque = collections.deque()  # (event, [dlpack views]) per committed batch

    def _view(self, tl) -> torch.Tensor:
        src = torch.from_dlpack(tl.as_tensor())
        if src.device.type == "cuda":
            self._pending.append(src)
        return src

    def images(self, tl, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a (B, C, H, W) channels-last tensor to copy into (e.g. one slice of a stacked multi-crop batch)."""
        src = self._view(tl).permute(0, 3, 1, 2)  # (B, C, H, W) view, channels-last strides
        if out is None:
            out = torch.empty(src.shape, dtype=dtype, device=self.device, memory_format=torch.channels_last)
        out.copy_(src, non_blocking=src.device.type == "cuda")
        return out

    def array(self, tl) -> torch.Tensor:
        src = self._view(tl)
        if src.device == self.device:
            return src.clone()
        # A host output for a GPU consumer (a graph that did not move it): a blocking copy, so the host buffer
        # has been read before DALI gets it back.
        return src.to(self.device, copy=True)

    def commit(self) -> None:
        """Close one batch: hold its GPU views until its copies are done; drop the views of finished batches."""
        while self._ring and self._ring[0][0].query():
            self._ring.popleft()
        if self._pending:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._ring.append((event, self._pending))
            self._pending = []

    def drain(self) -> None:
        """Wait for every queued copy and release every held DALI buffer."""
        self.commit()
        for event, _ in self._ring:
            event.synchronize()
        self._ring.clear()

    def __len__(self) -> int:
        return len(self._ring)


def images_to_torch(tl, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """DALI (B, H, W, C) batch -> a torch-owned (B, C, H, W) channels-last copy (see ``Handoff``). A one-off
    copy: on a GPU it waits for its own copy before releasing DALI's buffer; loops should hold a ``Handoff``."""
    h = Handoff(device)
    out = h.images(tl, dtype)
    h.drain()
    return out


def array_to_torch(tl, device: torch.device) -> torch.Tensor:
    """Small per-sample outputs (labels, pids, flags): a torch-owned copy on ``device`` (see ``images_to_torch``)."""
    h = Handoff(device)
    out = h.array(tl)
    h.drain()
    return out
