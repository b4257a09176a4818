"""`python -m eval export` and `python -m eval predict` on CPU: a real bundle from a real linear run, its reload
with weights_only, the eval view reproduced outside DALI, thresholds, and predictions over mixed inputs."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.__main__ import main as eval_main

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from bundlegen import make_bundle
    return make_bundle(tmp_path_factory.mktemp("export"))


def test_bundle_contents_and_weights_only_load(bundle):
    from eval.bundle import load_bundle
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["protocol"] == "linear" and meta["encoder"]["arch"] == "resnet18"
    assert meta["view"] == {"mode": "full", "image_size": 64}  # the eval default: the whole film
    assert meta["provenance"]["label_policy"] == {"blank": "zero", "uncertain": "u-ignore"}
    assert len(meta["provenance"]["manifest_sha256"]) == 64 and len(meta["encoder"]["sha256"]) == 64
    for t in meta["tasks"]:
        th = meta["thresholds"][t]
        assert 0 <= th["threshold"] <= 1 and th["rule"] == "youden"
        assert meta["metrics"][t]["test_auroc"] is not None
    doc = torch.load(bundle / "model.pt", weights_only=True)
    assert doc["head_weight"].shape == (len(meta["tasks"]), 512)
    card = (bundle / "README.md").read_text()
    assert "not a medical device" in card and all(t in card for t in meta["tasks"])
    b = load_bundle(bundle)
    assert b.tasks == meta["tasks"]


def test_bundle_reproduces_the_evaluated_test_scores(bundle, tmp_path):
    """The shard JPEGs through the bundle's torch view + model give the scores eval linear stored (DALI's)."""
    from eval.bundle import load_bundle
    from eval.predict import Predictor, view_tensor
    from ingest.schema import load_manifest
    from ingest.shards import iter_shard
    b = load_bundle(bundle)
    pred = Predictor(b)
    root = bundle.parent / "shards"
    xs = []
    for sh in load_manifest(root).shards("test"):
        for s in iter_shard(sh.path):
            gray = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L"))
            xs.append(view_tensor(gray, b.meta["view"], b.meta["normalisation"], 1))
    probs = pred.predict(torch.stack(xs)).probs
    with np.load(bundle.parent / "eval" / "linear" / "random-resnet18.npz") as z:
        names = [str(t) for t in z["tasks"]]
        ref = z["scores"][:, [names.index(t) for t in b.tasks]]
    # Same images in the same (unshuffled) order; resize kernels differ slightly between DALI and torch.
    assert probs.shape == ref.shape
    assert np.abs(probs - ref).max() < 0.05, np.abs(probs - ref).max()
    assert np.corrcoef(probs.ravel(), ref.ravel())[0, 1] > 0.98


def test_threshold_rules():
    from eval.export import choose_threshold
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1, np.nan], dtype=float)
    s = np.array([.1, .2, .3, .35, .8, .9, .6, .7, .5])
    t = choose_threshold(y, s)
    assert t["threshold"] == pytest.approx(0.7) and t["val_sensitivity"] == 0.75 and t["val_specificity"] == 1.0
    t = choose_threshold(y, s, sensitivity=1.0)
    assert t["threshold"] == pytest.approx(0.35) and t["val_sensitivity"] == 1.0
    assert choose_threshold(np.zeros(4), np.arange(4.0))["threshold"] == 0.5


def test_export_errors(bundle, tmp_path, capsys):
    out = bundle.parent / "eval"
    rc = eval_main(["export", "--out", str(out), "--encoder", "nope", "--protocol", "linear",
                    "--bundle", str(tmp_path / "b")])
    assert rc == 2 and "no result" in capsys.readouterr().err
    rc = eval_main(["export", "--out", str(out), "--encoder", "random-resnet18", "--protocol", "linear",
                    "--bundle", str(bundle)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    rc = eval_main(["predict", "--bundle", str(tmp_path / "bad"), "--input", str(tmp_path),
                    "--out", str(tmp_path / "p.csv")])
    assert rc == 2 and "not a bundle" in capsys.readouterr().err


def test_sensitivity_target_changes_thresholds(bundle, tmp_path):
    out = bundle.parent / "eval"
    rc = eval_main(["export", "--out", str(out), "--encoder", "random-resnet18", "--protocol", "linear",
                    "--bundle", str(tmp_path / "b"), "--sensitivity", "1"])
    assert rc == 0
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    for t in meta["tasks"]:
        th = meta["thresholds"][t]
        assert th["rule"] == "sensitivity>=1" and (th.get("val_sensitivity", 1.0) == 1.0)


def test_predict_mixed_folder(bundle, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    img = (rng.random((90, 120)) * 255).astype(np.uint8)
    Image.fromarray(img).save(inputs / "a.png")
    Image.fromarray(img).save(inputs / "b.jpg", quality=90)
    Image.fromarray((img.astype(np.uint16) * 257)).save(inputs / "c16.png")  # 16-bit PNG
    (inputs / "notes.png").write_text("not an image")
    (inputs / "empty.jpg").write_bytes(b"")
    good = (inputs / "b.jpg").read_bytes()
    (inputs / "trunc.jpg").write_bytes(good[: len(good) // 2])
    dcm = sorted((SHARED / "formats").glob("*.dcm")) if SHARED.is_dir() else []
    for d in dcm:
        (inputs / d.name).write_bytes(d.read_bytes())  # copied into tmp_path only
    out = tmp_path / "preds.csv"
    rc = eval_main(["predict", "--bundle", str(bundle), "--input", str(inputs), "--out", str(out), "--batch-size", "2",
                    "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out))}
    tasks = json.loads((bundle / "bundle.json").read_text())["tasks"]
    for name in ["a.png", "b.jpg", "c16.png", *[d.name for d in dcm]]:
        assert rows[name]["status"] == "ok", rows[name]
        for t in tasks:
            p = float(rows[name][f"p_{t}"])
            assert 0 <= p <= 1 and rows[name][f"flag_{t}"] in ("0", "1")
    assert "not a JPEG, PNG or DICOM" in rows["notes.png"]["reason"]
    assert rows["empty.jpg"]["status"] == "error" and "truncated" in rows["trunc.jpg"]["reason"]
    assert float(rows["a.png"][f"p_{tasks[0]}"]) == pytest.approx(float(rows["c16.png"][f"p_{tasks[0]}"]), abs=0.02)
    assert "unreadable: " in err and "images/s" in err


def test_export_of_a_trained_encoder_file(bundle, tmp_path):
    """The demo's path: `eval linear --encoder RUN/encoder.pt` then export; a changed encoder file is refused."""
    from bundlegen import FAST
    from trainer.checkpoint import save_encoder
    from trainer.models import build_backbone
    torch.manual_seed(7)
    model, _ = build_backbone("resnet18", 1, "random")
    enc = tmp_path / "run" / "encoder.pt"
    enc.parent.mkdir()
    save_encoder(enc, model, "resnet18", 1, {"config": {}, "step": 0})
    out = tmp_path / "eval"
    assert eval_main(["linear", "--shards", str(bundle.parent / "shards"), "--out", str(out),
                      "--encoder", str(enc), *FAST]) == 0
    args = ["export", "--out", str(out), "--encoder", "run", "--protocol", "linear", "--bundle", str(tmp_path / "b")]
    assert eval_main(args) == 0
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["encoder"]["category"] == "SSL" and meta["encoder"]["kind"] == "checkpoint"
    torch.manual_seed(8)
    save_encoder(enc, build_backbone("resnet18", 1, "random")[0], "resnet18", 1, {"config": {}, "step": 0})
    assert eval_main(args + ["--overwrite"]) == 2


def test_export_of_a_finetuned_network(bundle, tmp_path):
    """`eval finetune` then export: the fine-tuned trunk + head, thresholds from one validation pass; the bundle
    reproduces the fine-tuned test scores."""
    from bundlegen import FAST
    from eval.bundle import load_bundle
    from eval.predict import Predictor, view_tensor
    from ingest.schema import load_manifest
    from ingest.shards import iter_shard
    shards, out = bundle.parent / "shards", tmp_path / "eval"
    assert eval_main(["finetune", "--shards", str(shards), "--out", str(out), "--init", "random", *FAST,
                      "--epochs", "1"]) == 0
    assert eval_main(["export", "--out", str(out), "--encoder", "random-resnet18", "--protocol", "finetune",
                      "--bundle", str(tmp_path / "b")]) == 0
    b = load_bundle(tmp_path / "b")
    assert b.meta["protocol"] == "finetune" and float(b.model.heads.std.max()) == 1.0
    assert all("threshold" in b.meta["thresholds"][t] for t in b.tasks)
    xs = [view_tensor(np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L")), b.meta["view"],
                      b.meta["normalisation"], 1)
          for sh in load_manifest(shards).shards("test") for s in iter_shard(sh.path)]
    probs = Predictor(b).predict(torch.stack(xs)).probs
    with np.load(out / "finetune" / "random-resnet18.npz") as z:
        names = [str(t) for t in z["tasks"]]
        ref = z["scores"][:, [names.index(t) for t in b.tasks]]
    assert np.abs(probs - ref).max() < 0.05, np.abs(probs - ref).max()
