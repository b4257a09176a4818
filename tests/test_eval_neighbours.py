"""`python -m eval neighbours` and `python -m eval map`: PNG + CSV outputs whose keys, similarities and coordinates
match the shards and the cached features, samples read back by DALI-index offsets, figures linked from report.md."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from eval.__main__ import main as eval_main
from dali_pipes.shard_samples import SplitSamples
from eval.neighbours import caption_labels
from ingest.schema import load_manifest
from ingest.shards import iter_shard

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shardgen import make_shards
    return make_shards(tmp_path_factory.mktemp("nb") / "shards", num_patients=20, size_px=40, seed=2)


def _run(capsys, *argv):
    rc = eval_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _fast(shards, out):
    return ["--shards", shards, "--out", out, "--init", "random", "--arch", "resnet18", "--image-size", "32",
            "--resize-size", "36", "--batch-size", "16", "--device", "cpu"]


def test_split_samples_read_back_by_index_offsets(shards):
    samples = SplitSamples(shards, "train")
    tar_order = [s for sh in load_manifest(shards).shards("train") for s in iter_shard(sh.path)]
    assert len(samples) == len(tar_order)
    for i, s in enumerate(tar_order):
        assert samples.key(i) == s["__key__"] and samples.meta(i) == json.loads(s["json"])
    assert samples.image(0).dtype == np.uint8 and samples.image(0).ndim == 2
    assert caption_labels({"labels": {"A": 1, "B": -1, "C": 0, "D": None}}) == "A, u:B"
    assert caption_labels({"labels": {"A": 0}}) == "no positive label"


def test_neighbours_and_map_end_to_end(shards, tmp_path, capsys):
    from eval.features import Transform, encoder_spec, extract_features
    out = tmp_path / "eval"
    rc, err = _run(capsys, "neighbours", *_fast(shards, out), "--queries", "3", "--k", "4")
    assert rc == 0, err
    assert (out / "neighbours" / "random-resnet18.png").read_bytes()[:8] == PNG
    with open(out / "neighbours" / "random-resnet18.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 5 and [r["rank"] for r in rows[:5]] == ["0", "1", "2", "3", "4"]
    # Similarities in the captions are the cosine of the cached features of the named samples.
    spec = encoder_spec(init="random", arch="resnet18")
    feats = {s: extract_features(spec, shards, s, transform=Transform(32, 36), batch_size=16, cache_dir=out / "cache")
             for s in ("train", "test")}
    keys = {s: [SplitSamples(shards, s).key(i) for i in range(len(feats[s]))] for s in ("train", "test")}
    q = feats["test"].features[keys["test"].index(rows[0]["key"])]
    sims = []
    for r in rows[1:5]:
        assert r["split"] == "train"
        t = feats["train"].features[keys["train"].index(r["key"])]
        sims.append(float(r["cosine"]))
        assert float(r["cosine"]) == pytest.approx(q @ t / np.linalg.norm(q) / np.linalg.norm(t), abs=1e-4)
    assert sims == sorted(sims, reverse=True)
    all_sims = feats["train"].features @ q / np.linalg.norm(feats["train"].features, axis=1) / np.linalg.norm(q)
    assert sims[0] == pytest.approx(all_sims.max(), abs=1e-4)

    for colour, method in (("Cardiomegaly", "pca"), ("view", "tsne")):
        rc, err = _run(capsys, "map", *_fast(shards, out), "--color-by", colour, "--method", method, "--blank", "mask")
        assert rc == 0, err
        stem = f"random-resnet18-test-{method}-{colour}"
        assert (out / "map" / f"{stem}.png").read_bytes()[:8] == PNG
        with open(out / "map" / f"{stem}.csv") as f:
            pts = list(csv.DictReader(f))
        assert [p["key"] for p in pts] == keys["test"]
        assert all(np.isfinite(float(p["x"])) and np.isfinite(float(p["y"])) for p in pts)
    raw = feats["test"].labels[:, 0]
    with open(out / "map" / "random-resnet18-test-pca-Cardiomegaly.csv") as f:
        coloured = [p["Cardiomegaly"] for p in csv.DictReader(f)]
    assert coloured == ["positive" if v == 1 else "negative" if v == 0 else "masked" for v in raw]

    rc, err = _run(capsys, "knn", *_fast(shards, out), "--k", "3", "--bootstrap", "50")
    assert rc == 0, err
    rc, err = _run(capsys, "linear", *_fast(shards, out), "--bootstrap", "50")
    assert rc == 0, err
    rc, err = _run(capsys, "report", "--out", out)
    assert rc == 0, err
    md = (out / "report.md").read_text()
    knn = json.loads((out / "knn" / "random-resnet18.json").read_text())
    lin = json.loads((out / "linear" / "random-resnet18.json").read_text())
    row = next(ln for ln in md.splitlines() if ln.startswith("| Scratch: random-resnet18") and ln.count("|") == 4)
    cells = row.split(" | ")
    assert cells[1].startswith(f"{lin['mean_auroc']:.3f} [") and cells[2].startswith(f"{knn['mean_auroc']:.3f} [")
    assert "| Encoder | Linear probe | kNN |" in md
    assert "![random-resnet18](neighbours/random-resnet18.png)" in md and "map/random-resnet18-test-tsne-view.png" in md
    assert "## Weighted kNN" in md and "k = 3, T = 0.07" in md and "eval view: full" in md


def test_neighbours_and_map_bad_input_one_line(shards, tmp_path, capsys):
    out = tmp_path / "eval"
    for argv, expect in ((["neighbours", "--k", "999"], "larger than the training bank"),
                         (["map", "--color-by", "Nope"], "--color-by 'Nope': not a label"),
                         (["map", "--method", "umap"], "invalid choice")):
        rc, err = _run(capsys, argv[0], *_fast(shards, out), *argv[1:])
        assert rc == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
