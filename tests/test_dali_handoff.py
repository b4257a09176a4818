"""The DALI -> torch hand-off (every output owned by torch) and epoch boundaries (the next epoch's pipeline built
ahead, exact resume kept). GPU checks that would catch a buffer reused under a queued copy are marked ``gpu``."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import dali_pipes as dp
from dali_pipes import pipelines as P
from ingest.schema import load_manifest
from shardgen import make_shards

S = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("handoff") / "shards", num_patients=24, images_per_patient=(1,),
                       splits={"train": 1.0}, samples_per_shard=6)


def _pretrain(root, **kw):
    args = dict(batch_size=4, image_size=S, num_threads=1, seed=0, views="all")
    args.update(kw)
    return dp.build_pretrain_loader(root, **args)


def _pipe(root, device="cpu", batch_size=4):
    from nvidia.dali import types
    sh = load_manifest(root).shards("train")
    return P.build_pipeline(
        P.pretrain_graph, batch_size=batch_size, num_threads=1, device_id=0 if device == "gpu" else None, seed=1,
        prefetch=2, paths=[str(s.path) for s in sh], index_paths=[str(s.index_path) for s in sh], rank=0,
        world_size=1, reader_seed=3, shuffle_buffer=8, cfg=dp.AugmentConfig.preset("simclr-cxr"), image_size=S,
        channels=1, dali_dtype=types.FLOAT, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_handoff_copies_do_not_share_dali_memory(shards, dtype):
    pipe = _pipe(shards)
    outs = pipe.run()
    h = P.Handoff(torch.device("cpu"))
    img, pid = h.images(outs[0], dtype), h.array(outs[2])
    h.commit()
    assert img.shape == (4, 1, S, S) and img.dtype == dtype and img.is_contiguous(memory_format=torch.channels_last)
    dali_img, dali_pid = torch.from_dlpack(outs[0].as_tensor()), torch.from_dlpack(outs[2].as_tensor())
    assert torch.equal(img.float(), dali_img.permute(0, 3, 1, 2).to(dtype).float()) and torch.equal(pid, dali_pid)
    before = img.clone(), pid.clone()
    dali_img.fill_(123.0)  # write through DALI's own buffers: torch's tensors must not see it
    dali_pid.fill_(-7)
    assert torch.equal(img, before[0]) and torch.equal(pid, before[1])
    assert len(h) == 0  # nothing held on the CPU: the copy is complete on return


def test_loader_batches_survive_further_runs_unchanged(shards):
    loader = _pretrain(shards)
    kept, snapshots = [], []
    for _ in range(3):  # three epochs: later batches, pipelines built ahead, pipelines dropped
        for b in loader:
            kept.append(b)
            snapshots.append({k: v.clone() for k, v in b.items()})
    assert all(all(torch.equal(b[k], s[k]) for k in b) for b, s in zip(kept, snapshots))
    assert len({b["view1"].data_ptr() for b in kept}) == len(kept)


def test_gpu_graph_returns_every_output_on_the_gpu(shards):
    """pids and MICLe flags are moved inside the graph (``.gpu()``), not by a host DLPack round trip. Defined,
    never built: needs no GPU."""
    from nvidia.dali import types
    sh = load_manifest(shards).shards("train")
    common = dict(image_size=S, channels=1, dali_dtype=types.FLOAT16, device="gpu")
    graphs = [(P.pretrain_graph, dict(paths=[str(sh[0].path)], index_paths=[str(sh[0].index_path)], rank=0,
                                      world_size=1, reader_seed=1, shuffle_buffer=8,
                                      cfg=dp.AugmentConfig.preset("simclr-cxr"), **common)),
              (P.micle_graph, dict(source=lambda info: None, cfg=dp.AugmentConfig.preset("azizi"), **common))]
    for fn_, kw in graphs:
        pipe = P.define_pipeline(fn_, batch_size=2, num_threads=1, device_id=0, seed=0, prefetch=2, **kw)
        assert [n.device for n in pipe._graph_out] == ["gpu"] * len(pipe._graph_out), fn_.__name__


def test_next_epoch_is_built_ahead_and_batches_do_not_change(shards, monkeypatch):
    built_in: list[tuple[int, str]] = []
    real_build = dp.PretrainLoader._build

    def spy(self, epoch, restore):
        built_in.append((epoch, threading.current_thread().name))
        return real_build(self, epoch, restore)

    monkeypatch.setattr(dp.PretrainLoader, "_build", spy)
    ahead = _pretrain(shards, seed=5)
    epochs = [list(ahead) for _ in range(3)]
    assert built_in[0] == (0, "MainThread")
    assert [e for e, _ in built_in[1:3]] == [1, 2] and all(t.startswith("dali-build-ahead") for _, t in built_in[1:])
    plain = _pretrain(shards, seed=5, build_ahead=False)
    for e in range(3):
        assert all(all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(epochs[e], list(plain)))
    ahead.close()


def test_resume_and_set_epoch_drop_a_pipeline_built_for_another_epoch(shards):
    ref = _pretrain(shards, seed=9)
    it = iter(ref)
    next(it)  # epoch 1 is being built ahead now
    state = ref.state_dict()
    tail = list(it)
    ref.set_epoch(0)  # back to epoch 0: the epoch-1 pipeline is dropped, epoch 0 rebuilt from its seed
    again = list(ref)
    assert len(again) == len(ref) and all(torch.equal(a["pids"], b["pids"]) for a, b in zip(again[1:], tail))
    resumed = _pretrain(shards, seed=9)
    resumed.load_state_dict(state)
    assert all(torch.equal(a["view1"], b["view1"]) for a, b in zip(list(resumed), tail))
    ref.close()
    assert ref._ahead is None and ref._executor is None


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_slow_consumer_reads_the_batch_dali_produced(shards):
    """A copy queued behind long GPU work must still read this batch's pixels, however far DALI runs ahead and
    recycles memory: a slow consumer's batches equal a fast one's, with the same seed."""
    def run(slow: bool) -> list[dict]:
        loader = _pretrain(shards, device="gpu", seed=3, prefetch=1)
        out = []
        for _ in range(2):
            for b in loader:
                if slow:
                    torch.cuda._sleep(50_000_000)  # the copies of the next batch queue behind this
                out.append(b)
        torch.cuda.synchronize()
        return [{k: v.cpu() for k, v in b.items()} for b in out]

    fast, slow = run(False), run(True)
    assert all(all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(fast, slow))


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_handoff_ring_holds_dali_buffers_until_the_copies_ran(shards):
    pipe = _pipe(shards, device="gpu")
    h = P.Handoff(torch.device("cuda", torch.cuda.current_device()))
    outs = pipe.run()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the truth, read now on a stream that is not behind the sleep
        expected = torch.from_dlpack(outs[0].as_tensor()).permute(0, 3, 1, 2).clone()
    side.synchronize()
    torch.cuda._sleep(200_000_000)  # the hand-off copy queues behind this
    img = h.images(outs[0], torch.float32)
    h.commit()
    assert len(h) == 1  # held: the copy has not run yet
    del outs
    for _ in range(6):  # DALI runs on and recycles whatever it may
        pipe.run()
    h.drain()
    assert len(h) == 0 and torch.equal(img, expected)
