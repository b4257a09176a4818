"""`python -m bench data --quick`: the DALI-vs-torchvision benchmark runs end to end on the CPU and writes JSON."""
from __future__ import annotations

import json
import math

from bench.data_bench import main


def test_bench_data_quick_writes_rows(tmp_path):
    out = tmp_path / "data.json"
    assert main(["--quick", "--threads", "1", "--devices", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    loaders = {r["loader"] for r in doc["rows"]}
    assert loaders == {"dali-cpu", "torchvision+webdataset", "dali-cpu-views-index", "dali-cpu-frontal-tar"}
    for r in doc["rows"]:
        assert r["samples_per_s"] > 0 and math.isclose(r["views_per_s"], 2 * r["samples_per_s"])
        assert r["cpu_cores_used"] >= 0  # /proc ticks are 10 ms: a tiny timed window may round to 0
    assert doc["command"].startswith("python -m bench data --quick")
    # like for like: one augmentation, shuffle buffer, batch size and thread/worker count for both loaders
    same = ("augment", "image_size", "channels", "dtype", "shuffle_buffer", "batch_size", "workers_or_threads",
            "cores_available")
    assert len({tuple(r[k] for k in same) for r in doc["rows"]}) == 1
    assert any("dali-cpu / baseline" in n and "goal >= 1.5x" in n for n in doc["notes"])
    assert any("view-filtered index / from frontal-only tars" in n for n in doc["notes"])


def test_bench_data_bad_shards_is_a_one_line_error(tmp_path, capsys):
    assert main(["--shards", str(tmp_path / "missing"), "--devices", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_bench_gpu_rows_pipeline_traces_on_gpu(tmp_path, monkeypatch):
    """The gpu rows cannot run here; their loader is built through the bench's own `dali_loader` with a GPU
    pretended, and its epoch pipeline only *defined*: DALI validates every argument, and every op from the nvJPEG
    decoder to the views must sit on the GPU, with the bench's gpu batch size and dtype."""
    from nvidia.dali import types
    from test_dali_pipes import _image_nodes_devices

    import torch
    from bench.data_bench import dali_loader, parse_args, write_bench_shards
    from dali_pipes import pipelines as P

    root = write_bench_shards(tmp_path / "shards", num_images=24, size_px=48, samples_per_shard=8)
    monkeypatch.setattr(P, "resolve_device", lambda device, device_id: (0, torch.device("cuda", 0)))
    monkeypatch.setattr(P, "build_pipeline", P.define_pipeline)  # define (validate), never build: no GPU needed
    args = parse_args(["--image-size", "32", "--gpu-batch-size", "6", "--batch-size", "4", "--dtype", "bfloat16",
                       "--shuffle-buffer", "8"])
    for micle in (False, True):
        loader = dali_loader(root, args, device="gpu", threads=2, micle=micle)
        pipe = loader._build(0, None).pipe
        assert pipe.max_batch_size == 6 and pipe.num_threads == 2
        nodes = _image_nodes_devices(pipe)
        assert any(d == "mixed" for _, d in nodes) and all(d in ("gpu", "mixed") for _, d in nodes), nodes
        assert loader._dali_dtype == types.FLOAT16 and loader.dtype == torch.bfloat16  # bf16 from DALI fp16
        loader._release()


def _burn_cpu(seconds: float) -> None:
    import time
    while time.process_time() < seconds:
        pass


def test_cpu_seconds_count_workers_that_exit_in_the_window():
    # A DataLoader's workers exit at each epoch end; their CPU time must still be counted (reaped-children sum).
    import multiprocessing as mp

    from bench.data_bench import _cpu_s

    worker = mp.get_context("fork").Process(target=_burn_cpu, args=(0.3,))
    before = _cpu_s(lambda: [])
    worker.start()
    live = _cpu_s(lambda: [worker.pid] if worker.is_alive() else [])
    worker.join()
    after = _cpu_s(lambda: [])
    assert after - before >= 0.28 and after >= live


def test_bench_window_across_epoch_ends(tmp_path):
    # 24 images, batch 4: 6 batches per epoch, so 1 warm-up + 8 timed batches cross an epoch end in both loaders.
    out = tmp_path / "d.json"
    argv = ["--num-images", "24", "--size-px", "48", "--samples-per-shard", "8", "--image-size", "32",
            "--batch-size", "4", "--batches", "8", "--warmup-batches", "1", "--threads", "1", "--devices", "cpu",
            "--shuffle-buffer", "8", "--no-view-filter", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["loader"] for r in rows] == ["dali-cpu", "torchvision+webdataset"]
    assert all(r["cpu_s"] > 0 and r["samples_per_s"] > 0 for r in rows)
