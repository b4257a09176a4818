"""dali_pipes on the CPU: shapes / dtypes / channels-last, determinism, epochs, ranks, MICLe pairs, eval coverage,
exact resume, presets and error messages. GPU-only checks are marked ``gpu``."""
from __future__ import annotations

import io
import json
import math
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dali_pipes as dp
from dali_pipes.sources import MicleSource, build_image_table
from ingest.schema import (FORMAT_VERSION, FRONTAL_VIEWS, MANIFEST_NAME, SHARD_PATTERN, VIEWS, ShardFormatError,
                           load_manifest)
from ingest.shards import iter_shard, write_shard
from shardgen import make_shards


S = 32  # output image size for every CPU test: small keeps the whole file fast


@pytest.fixture(scope="module")
def unique_shards(tmp_path_factory) -> Path:
    """One image per patient (pid identifies a sample): 24 train / 12 val / 12 test samples, 5-8 per shard."""
    return make_shards(tmp_path_factory.mktemp("uniq") / "shards", num_patients=48, images_per_patient=(1,),
                       samples_per_shard=5)


@pytest.fixture(scope="module")
def multi_shards(tmp_path_factory) -> Path:
    """Patients with 1-3 images (MICLe), 20 patients -> ~20 train images."""
    return make_shards(tmp_path_factory.mktemp("multi") / "shards", num_patients=20, images_per_patient=(1, 2, 3),
                       splits={"train": 1.0}, samples_per_shard=6)


def _tar_samples(root: Path, split: str) -> list[dict]:
    out = []
    for sh in load_manifest(root).shards(split):
        for s in iter_shard(sh.path):
            out.append({"pid": struct.unpack("<q", s["pid"])[0], "lbl": np.frombuffer(s["lbl"], "<f4"),
                        "json": json.loads(s["json"])})
    return out


def _pretrain(root, **kw):
    args = dict(batch_size=4, image_size=S, num_threads=1, seed=0)
    args.update(kw)
    return dp.build_pretrain_loader(root, **args)


def _eq(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(_eq(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [1, 3])
def test_pretrain_shapes_dtypes_channels_last(unique_shards, dtype, channels):
    loader = _pretrain(unique_shards, dtype=dtype, channels=channels)
    batches = list(loader)
    assert len(batches) == len(loader) == 24 // 4
    for b in batches:
        for k in ("view1", "view2"):
            v = b[k]
            assert v.shape == (4, channels, S, S) and v.dtype == dtype and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert v.stride() == (S * S * channels, 1, S * channels, channels)
            assert torch.isfinite(v.float()).all()
        assert b["pids"].shape == (4,) and b["pids"].dtype == torch.int64
        if channels == 3:  # replicated gray: identical channels
            assert torch.equal(b["view1"][:, 0], b["view1"][:, 2])


def test_views_differ_and_are_normalised(unique_shards):
    b = next(iter(_pretrain(unique_shards)))
    assert not torch.equal(b["view1"], b["view2"])
    x = b["view1"]
    assert -1.99 <= x.min() < 0 < x.max() <= 2.01  # (0 - 0.498)/0.251 and (1 - 0.498)/0.251


def test_same_seed_same_batches_other_seed_differs(unique_shards):
    a, b = list(_pretrain(unique_shards, seed=3)), list(_pretrain(unique_shards, seed=3))
    c = list(_pretrain(unique_shards, seed=4))
    assert _same(a, b)
    assert not _same(a, c)


def test_epochs_reshuffle_reproducibly_without_repeats(unique_shards):
    loader = _pretrain(unique_shards, seed=1)
    e0 = list(loader)           # a full pass advances to epoch 1 by itself
    assert loader.epoch == 1
    e1 = list(loader)
    loader.set_epoch(0)
    e0_again = list(loader)
    for ep in (e0, e1):
        pids = torch.cat([b["pids"] for b in ep]).tolist()
        assert len(pids) == len(set(pids)) == 24  # drop-last keeps all 24: 6 full batches, no sample twice
    assert _same(e0, e0_again)
    assert torch.cat([b["pids"] for b in e0]).tolist() != torch.cat([b["pids"] for b in e1]).tolist()
    fresh = _pretrain(unique_shards, seed=1)
    fresh.set_epoch(1)  # epoch e depends only on (seed, e): nothing is replayed or skipped to get there
    assert _same(list(fresh), e1) and fresh.epoch == 2


def _pass_pids(loader) -> list[int]:
    return torch.cat([b["pids"] for b in loader]).tolist()


def test_shard_order_and_shuffle_buffer_reseeded_every_epoch(unique_shards, tmp_path):
    # Shard order: DALI gives each rank a contiguous run of the (permuted) tar list, so which samples a rank sees
    # changes between epochs only if the tar order is redrawn. Both ranks stay disjoint in every epoch.
    rank_sets = {r: [] for r in range(2)}
    for r in range(2):
        loader = _pretrain(unique_shards, batch_size=4, rank=r, world_size=2, seed=7)  # 12 per rank: none dropped
        for _ in range(3):
            rank_sets[r].append(frozenset(_pass_pids(loader)))
    for e in range(3):
        assert len(rank_sets[0][e] | rank_sets[1][e]) == 24 and not rank_sets[0][e] & rank_sets[1][e]
    assert len(set(rank_sets[0])) > 1, "rank 0 saw the same samples every epoch: tar order not reshuffled"
    # Shuffle buffer: with a single tar only the reader's buffer shuffle can change the order between epochs.
    one = make_shards(tmp_path / "one", num_patients=16, images_per_patient=(1,), splits={"train": 1.0},
                      samples_per_shard=64)
    loader = _pretrain(one, batch_size=4, seed=2)
    orders = [_pass_pids(loader) for _ in range(3)]
    assert all(sorted(o) == sorted(orders[0]) for o in orders) and len(set(map(tuple, orders))) == 3


def test_two_ranks_split_an_epoch_and_drop_last(unique_shards):
    # batch 5, 2 ranks: 12 samples per rank -> 2 full batches each (2 samples per rank dropped), never shared.
    seen = []
    for rank in range(2):
        loader = _pretrain(unique_shards, batch_size=5, rank=rank, world_size=2, seed=7)
        batches = list(loader)
        assert len(loader) == len(batches) == 2
        seen.append(set(torch.cat([b["pids"] for b in batches]).tolist()))
    assert len(seen[0]) == len(seen[1]) == 10 and not seen[0] & seen[1]


def test_pids_survive(unique_shards):
    tar_pids = sorted(s["pid"] for s in _tar_samples(unique_shards, "train"))
    got = sorted(torch.cat([b["pids"] for b in _pretrain(unique_shards)]).tolist())
    assert got == tar_pids


@pytest.mark.parametrize("micle", [False, True])
def test_resume_gives_identical_remaining_batches(multi_shards, micle):
    # every op of the graph (crop, rotation, jitter, conditional blur, flip) carries RNG state to restore
    kw = dict(batch_size=3, micle=micle, seed=11, augment=dp.AugmentConfig.preset("simclr-cxr", rotation_deg=10.0))
    ref = _pretrain(multi_shards, **kw)
    it = iter(ref)
    head = [next(it) for _ in range(2)]
    state = ref.state_dict()
    state = json.loads(json.dumps(state))  # must survive a trainer checkpoint (plain JSON types)
    tail, next_epoch = list(it), list(ref)
    assert head and tail
    resumed = _pretrain(multi_shards, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # a trainer loop calls this; it must not restart the epoch
    assert _same(list(resumed), tail)
    assert _same(list(resumed), next_epoch)


def test_resume_rejects_other_config(multi_shards):
    a = _pretrain(multi_shards, batch_size=3)
    next(iter(a))
    with pytest.raises(ValueError, match="batch_size"):
        _pretrain(multi_shards, batch_size=2).load_state_dict(a.state_dict())


def _write_views_shards(root: Path, views_per_patient: list[list[str]],
                        pixel_range: tuple[int, int] = (0, 255)) -> Path:
    """Shards where patient p has images with the given views (to test the frontal filter), pixels uniform in
    ``pixel_range``."""
    rng = np.random.default_rng(0)
    samples = []
    for p, views in enumerate(views_per_patient):
        for v, view in enumerate(views):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(*pixel_range, (40, 48), dtype=np.uint8), mode="L").save(buf, format="JPEG")
            samples.append({"__key__": f"t-p{p}-v{v}", "jpg": buf.getvalue(),
                            "json": json.dumps({"view": view, "patient_id": f"p{p}"}).encode(),
                            "lbl": struct.pack("<1f", 0.0), "pid": struct.pack("<q", p)})
    rng.shuffle(samples)
    w = write_shard(root / "train" / SHARD_PATTERN.format(index=0), samples)
    manifest = {"format_version": FORMAT_VERSION, "datasets": ["t"], "label_names": ["x"],
                "num_patients": len(views_per_patient), "rejects": [],
                "splits": {"train": {"num_samples": w.num_samples, "shards": [
                    {"name": w.name, "num_samples": w.num_samples, "sha256": w.sha256, "num_bytes": w.num_bytes}]}}}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def test_micle_pairs_share_patient_distinct_when_possible(tmp_path):
    views = [["PA", "LAT"], ["PA", "AP", "LAT"], ["AP"], ["PA", "PA", "PA"], ["LAT", "LAT"], ["PA"], ["AP", "PA"]]
    root = _write_views_shards(tmp_path / "v", views)
    table = build_image_table(load_manifest(root), "train", views=FRONTAL_VIEWS)
    assert int(table.usable.sum()) == 10  # LAT images excluded
    for epoch in range(3):
        src = MicleSource(table, batch_size=2, rank=0, world_size=1, seed=0, epoch=epoch)
        anchors, partners = src._plan
        assert len(anchors) == 10
        assert (table.pid[anchors] == table.pid[partners]).all()
        assert table.usable[anchors].all() and table.usable[partners].all()
        multi = np.isin(table.pid[anchors], [1, 3, 6])  # patients with 2+ frontal images
        assert ((anchors != partners) == multi).all()
        assert src.multi_instance_fraction() == pytest.approx(multi.mean())
        src.close()
    all_views = build_image_table(load_manifest(root), "train", views=frozenset(VIEWS))
    assert all_views.usable.all()


def test_view_filter_reads_through_the_webdataset_reader(tmp_path):
    views = [["PA", "LAT"], ["PA", "AP", "LAT"], ["AP"], ["PA", "PA", "PA"], ["LAT", "LAT"], ["UNKNOWN"], ["AP", "PA"]]
    root = _write_views_shards(tmp_path / "v", views)
    frontal_pids = sorted(p for p, vs in enumerate(views) for v in vs if v != "LAT")  # UNKNOWN is frontal
    loader = _pretrain(root, batch_size=5, views="frontal")
    assert loader.data_path == "webdataset reader" and loader.num_usable == 10 and len(loader) == 2
    got = [torch.cat([b["pids"] for b in loader]) for _ in range(2)]  # two epochs
    assert sorted(got[0].tolist()) == sorted(got[1].tolist()) == frontal_pids
    assert got[0].tolist() != got[1].tolist()  # reshuffled
    pa_ap = _pretrain(root, batch_size=3, views="PA,AP")  # a list: UNKNOWN is not in it
    assert pa_ap.num_usable == 9 and 5 not in torch.cat([b["pids"] for b in pa_ap]).tolist()
    # exact resume on the filtered index
    ref = _pretrain(root, batch_size=2, views="frontal", seed=4)
    it = iter(ref)
    next(it)
    state = ref.state_dict()
    tail = list(it)
    again = _pretrain(root, batch_size=2, views="frontal", seed=4)
    again.load_state_dict(state)
    assert _same(list(again), tail)
    everything = _pretrain(root, batch_size=7, views="all")  # 14 images, 2 full batches, the ingest index
    assert everything._reader_shards[0].index == load_manifest(root).shards("train")[0].index_path
    every_pid = sorted(p for p, vs in enumerate(views) for _ in vs)
    assert sorted(torch.cat([b["pids"] for b in everything]).tolist()) == every_pid


def test_filter_that_empties_a_split_names_filter_and_count(tmp_path):
    root = _write_views_shards(tmp_path / "v", [["LAT"], ["LAT", "LAT"], ["PA"]])
    with pytest.raises(ValueError, match=r"views=frontal removed 3 of 4 images; 1 usable"):
        _pretrain(root, batch_size=2, views="frontal")
    with pytest.raises(ValueError, match=r"views=AP removed 4 of 4 images; 0 usable"):
        _pretrain(root, batch_size=2, views="AP")
    folder = _write_views_shards(tmp_path / "u", [["UNKNOWN"], ["UNKNOWN"]])  # folder / DICOM shards: no view known
    assert _pretrain(folder, batch_size=2, views="frontal").num_usable == 2


def test_micle_loader_second_view_is_partner_image(multi_shards):
    # With a no-op augmentation the two views are equal exactly when the pair is one image taken twice.
    ident = dp.AugmentConfig.preset("moco-cxr", rotation_deg=0.0, hflip_prob=0.0)
    loader = _pretrain(multi_shards, micle=True, augment=ident, batch_size=3)
    flags, pids = [], []
    for b in loader:
        same = (b["view1"] == b["view2"]).flatten(1).all(1)
        assert torch.equal(same, ~b["multi_instance"])
        flags.append(b["multi_instance"])
        pids += b["pids"].tolist()
    # pids survive the external-source path: each anchor image once per epoch (drop-last), with its own pid
    tar = Counter(s["pid"] for s in _tar_samples(multi_shards, "train"))
    assert len(pids) == 3 * len(loader) and not Counter(pids) - tar
    assert sum(tar.values()) - len(pids) < 3
    frac = torch.cat(flags).float().mean().item()
    assert 0 < frac < 1 and loader.multi_instance_fraction > 0
    normal = next(iter(_pretrain(multi_shards, augment=ident, batch_size=3)))
    assert torch.equal(normal["view1"], normal["view2"])


@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 3), (2, 5), (5, 2)])  # 5 ranks: 2-3 samples each
def test_eval_ranks_cover_every_sample_once(unique_shards, world_size, batch_size):
    truth = {s["pid"]: s["lbl"] for s in _tar_samples(unique_shards, "val")}
    counted: list[int] = []
    lengths = []
    for rank in range(world_size):
        loader = dp.build_eval_loader(unique_shards, "val", batch_size=batch_size, image_size=S, resize_size=40,
                                      rank=rank, world_size=world_size, num_threads=1)
        assert loader.label_names == ["Cardiomegaly", "Edema", "Pleural Effusion"]
        lengths.append(len(loader))
        for b in loader:
            assert b["images"].shape == (batch_size, 1, S, S)
            assert b["images"].is_contiguous(memory_format=torch.channels_last)
            assert b["labels"].shape == (batch_size, 3) and b["labels"].dtype == torch.float32
            for pid, lbl in zip(b["pids"][b["valid"]].tolist(), b["labels"][b["valid"]].numpy()):
                np.testing.assert_array_equal(lbl, truth[pid])  # NaN and -1 preserved
                counted.append(pid)
    assert len(set(lengths)) == 1  # every rank runs the same number of batches (collectives stay in step)
    assert sorted(counted) == sorted(truth)
    assert any(np.isnan(v).any() for v in truth.values()) or any((v == -1).any() for v in truth.values())


def test_eval_is_deterministic_and_centre_cropped(unique_shards):
    kw = dict(batch_size=4, image_size=S, resize_size=S, num_threads=1, channels=3, dtype=torch.float16)
    a = list(dp.build_eval_loader(unique_shards, "test", **kw))
    b = list(dp.build_eval_loader(unique_shards, "test", **kw))
    assert _same(a, b)
    assert a[0]["images"].shape == (4, 3, S, S) and a[0]["images"].dtype == torch.float16


def test_clear_errors(tmp_path, unique_shards):
    with pytest.raises(ShardFormatError, match="does not exist"):
        _pretrain(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardFormatError, match="no manifest"):
        dp.build_eval_loader(tmp_path / "empty", "val", batch_size=2)
    with pytest.raises(ValueError, match="channels=3"):
        _pretrain(unique_shards, augment="simclr", channels=1)
    with pytest.raises(ShardFormatError, match="no split"):
        _pretrain(unique_shards, split="holdout")
    with pytest.raises(ValueError, match="cannot fill one batch"):
        _pretrain(unique_shards, batch_size=64)


def test_empty_shard_folder_and_empty_split(tmp_path):
    root = make_shards(tmp_path / "s", num_patients=8, images_per_patient=(1,))
    for f in (root / "val").iterdir():  # the split's folder emptied behind the manifest's back
        f.unlink()
    with pytest.raises(ShardFormatError, match=r"val.*shard listed in the manifest is missing"):
        dp.build_eval_loader(root, "val", batch_size=2)
    m = json.loads((root / MANIFEST_NAME).read_text())
    m["splits"]["val"] = {"num_samples": 0, "shards": []}  # a split that ingest left empty
    (root / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ShardFormatError, match="split 'val' has no samples"):
        dp.build_eval_loader(root, "val", batch_size=2)


def test_missing_index_and_version(tmp_path):
    root = make_shards(tmp_path / "s", num_patients=8, images_per_patient=(1,))
    m = json.loads((root / MANIFEST_NAME).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (root / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ShardFormatError, match="format version"):
        _pretrain(root)
    m["format_version"] = FORMAT_VERSION
    (root / MANIFEST_NAME).write_text(json.dumps(m))
    next((root / "train").glob("*.idx")).unlink()
    with pytest.raises(ShardFormatError, match="DALI index missing"):
        _pretrain(root)


def _image_nodes_devices(pipe) -> list[tuple[str, str]]:
    """(node name, operator device) for every node whose data derives from the decoded images. Per-sample
    parameters (random draws, the jitter factors combined with CPU arithmetic) and pids legitimately stay on the
    CPU; anything computed from pixels must not. Operator device, not node device: a CPU result moved by ``.gpu()``
    is a "gpu" node of a "cpu" operator."""
    memo: dict[tuple[str, str], bool] = {}
    out: list[tuple[str, str]] = []

    def from_images(node) -> bool:
        key = (node.name, node.device)
        if key not in memo:
            op = node.source
            inputs = list(op.inputs)[: op.spec.NumRegularInput()]  # data, not argument inputs
            deps = [from_images(i) for i in inputs]  # evaluate all: every branch gets visited
            memo[key] = op._op.device == "mixed" or any(deps)  # the decoder is the only "mixed" operator
            if memo[key]:
                out.append((node.name, op._op.device))
        return memo[key]

    for node in pipe._graph_out:
        from_images(node)
    return out


@pytest.mark.parametrize("graph", ["simclr-cxr", "azizi", "moco-cxr", "simclr", "micle", "eval"])
def test_gpu_graph_traces_with_every_image_op_on_gpu(unique_shards, graph):
    """Without a GPU the gpu graph can still be *defined*: DALI validates every argument at definition, and each
    op between the decoder and the outputs must sit on the GPU (decoder 'mixed' -> gpu)."""
    from dali_pipes import pipelines as P
    from nvidia.dali import types

    sh = load_manifest(unique_shards).shards("train")
    paths, idx = [str(s.path) for s in sh], [str(s.index_path) for s in sh]
    common = dict(image_size=S, channels=3, dali_dtype=types.FLOAT16, device="gpu")
    if graph == "eval":
        fn_, kw = P.eval_graph, dict(paths=paths, index_paths=idx, rank=0, world_size=1, resize_size=40, **common)
    elif graph == "micle":
        fn_, kw = P.micle_graph, dict(source=lambda info: None, cfg=dp.AugmentConfig.preset("azizi"), **common)
    else:
        fn_, kw = P.pretrain_graph, dict(paths=paths, index_paths=idx, rank=0, world_size=1, reader_seed=1,
                                         shuffle_buffer=8, cfg=dp.AugmentConfig.preset(graph), **common)

    # defined, never built: needs no GPU
    pipe = P.define_pipeline(fn_, batch_size=2, num_threads=1, device_id=0, seed=0, prefetch=2, **kw)
    nodes = _image_nodes_devices(pipe)
    assert len(nodes) >= 3 and any(d == "mixed" for _, d in nodes)
    assert all(d in ("gpu", "mixed") for _, d in nodes), nodes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; this machine has a GPU")
def test_gpu_requested_without_gpu_is_a_clear_error(unique_shards):
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        _pretrain(unique_shards, device="gpu")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        dp.build_eval_loader(unique_shards, "val", batch_size=2, device="gpu")


@pytest.mark.gpu
@pytest.mark.dali
@pytest.mark.parametrize("micle", [False, True])
def test_gpu_pretrain_on_device_channels_last(multi_shards, micle):
    loader = _pretrain(multi_shards, device="gpu", micle=micle, dtype=torch.bfloat16, channels=3, batch_size=3)
    for b in loader:
        assert b["view1"].is_cuda and b["pids"].is_cuda and b["view1"].dtype == torch.bfloat16
        assert b["view1"].is_contiguous(memory_format=torch.channels_last)
        assert not torch.equal(b["view1"], b["view2"])


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_eval_matches_cpu(unique_shards):
    kw = dict(batch_size=4, image_size=S, resize_size=40, num_threads=1)
    cpu = list(dp.build_eval_loader(unique_shards, "val", device="cpu", **kw))
    gpu = list(dp.build_eval_loader(unique_shards, "val", device="gpu", **kw))
    for c, g in zip(cpu, gpu):
        assert torch.equal(c["pids"], g["pids"].cpu()) and torch.equal(c["valid"], g["valid"].cpu())
        # nvJPEG vs libjpeg-turbo IDCT and GPU resampling differ by a few gray levels at most
        assert (c["images"] - g["images"].cpu()).abs().mean() < 4 / 255 / dp.CXR_STD


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_same_seed_same_batches(unique_shards):
    a, b = list(_pretrain(unique_shards, device="gpu", seed=2)), list(_pretrain(unique_shards, device="gpu", seed=2))
    assert _same(a, b)


def test_rank_outside_world_is_rejected(unique_shards):
    with pytest.raises(ValueError, match="outside world_size"):
        _pretrain(unique_shards, rank=2, world_size=2)
    assert math.isclose(dp.CXR_MEAN, 0.4982) and math.isclose(dp.CXR_STD, 0.2511)


def test_batches_stay_valid_after_later_runs(unique_shards):
    # batches are torch-owned copies (dali_pipes.pipelines.Handoff): later runs and new pipelines cannot touch them
    kept, snapshots = [], []
    loader = _pretrain(unique_shards, dtype=torch.float32)
    for b in loader:
        kept.append(b["view1"])
        snapshots.append(b["view1"].clone())
    assert len({k.data_ptr() for k in kept}) == len(kept)
    import gc
    gc.collect()  # the epoch's pipeline is gone now; its outputs must outlive it
    list(loader)  # and a new pipeline allocating fresh buffers must not reuse theirs
    assert all(torch.equal(k, s) for k, s in zip(kept, snapshots))


def test_eval_pixels_match_a_pil_reference(unique_shards):
    # Orientation, resize-shorter-side + centre crop and normalisation against PIL on the raw tar JPEGs.
    tar = {}
    for sh in load_manifest(unique_shards).shards("val"):
        for s in iter_shard(sh.path):
            tar[struct.unpack("<q", s["pid"])[0]] = Image.open(io.BytesIO(s["jpg"])).convert("L")
    loader = dp.build_eval_loader(unique_shards, "val", batch_size=4, image_size=S, resize_size=40, num_threads=1)
    for b in loader:
        for img, pid in zip(b["images"][b["valid"]], b["pids"][b["valid"]].tolist()):
            src = tar[pid]
            w, h = src.size  # portrait/landscape kept: shorter side -> 40
            size = (40, round(h * 40 / w)) if w <= h else (round(w * 40 / h), 40)
            ref = np.asarray(src.resize(size, Image.BILINEAR), dtype=np.float32)
            top, left = (ref.shape[0] - S) // 2, (ref.shape[1] - S) // 2
            ref = (ref[top : top + S, left : left + S] / 255.0 - dp.CXR_MEAN) / dp.CXR_STD
            diff = np.abs(img[0].numpy() - ref)
            assert diff.mean() < 2 / 255 / dp.CXR_STD, diff.mean()  # ~0.01 seen; a mirrored crop gives ~0.4


def test_real_cxr_jpegs_through_both_loaders(shared_data, tmp_path):
    """Real radiographs (8-bit gray baseline JPEGs, 400x300) written as shards as-is: both loaders run and the eval
    view matches the PIL reference, on images the synthetic fixtures do not resemble."""
    files = sorted((shared_data / "pneumonia-mini" / "Normal").glob("*.jpeg"))[:8]
    if len(files) < 8:
        pytest.skip("pneumonia-mini/Normal has fewer than 8 images")
    samples = [{"__key__": f"real-p{i}-s1-v1", "jpg": f.read_bytes(), "json": json.dumps({"view": "PA"}).encode(),
                "lbl": struct.pack("<1f", 0.0), "pid": struct.pack("<q", i // 2)} for i, f in enumerate(files)]
    root = tmp_path / "real"
    for split in ("train", "val"):
        w = write_shard(root / split / SHARD_PATTERN.format(index=0), samples)
        entry = {"num_samples": w.num_samples, "shards": [{"name": w.name, "num_samples": w.num_samples,
                                                          "sha256": w.sha256, "num_bytes": w.num_bytes}]}
        manifest = json.loads((root / MANIFEST_NAME).read_text()) if (root / MANIFEST_NAME).exists() else {
            "format_version": FORMAT_VERSION, "datasets": ["real"], "label_names": ["x"], "num_patients": 4,
            "rejects": [], "splits": {}}
        manifest["splits"][split] = entry
        (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    micle = _pretrain(root, micle=True, batch_size=4, image_size=64)
    assert [b["view1"].shape for b in micle] == [(4, 1, 64, 64)] * 2 and micle.multi_instance_fraction == 1.0
    loader = dp.build_eval_loader(root, "val", batch_size=8, image_size=64, resize_size=72, num_threads=1)
    b = next(iter(loader))
    for img, f in zip(b["images"], files):
        src = Image.open(f).convert("L")  # 400 x 300: shorter side (height) -> 72
        ref = np.asarray(src.resize((96, 72), Image.BILINEAR), dtype=np.float32)[4:68, 16:80]
        ref = (ref / 255.0 - dp.CXR_MEAN) / dp.CXR_STD
        assert np.abs(img[0].numpy() - ref).mean() < 2 / 255 / dp.CXR_STD
