"""`python -m eval export` and `python -m eval predict` on CPU: a real bundle from a real linear run, its reload
with weights_only, the eval view reproduced outside DALI, thresholds, and predictions over mixed inputs."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
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
        th, m = meta["thresholds"][t], meta["metrics"][t]
        assert th["rule"] == "youden" and m["test_auroc"] is not None
        assert th["validated"] == (m["val_auroc_ci"][0] is not None and m["val_auroc_ci"][0] > 0.5)
        assert (0 <= th["threshold"] <= 1) if th["validated"] else th["threshold"] is None
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
            validated = json.loads((bundle / "bundle.json").read_text())["thresholds"][t]["validated"]
            assert 0 <= p <= 1 and rows[name][f"flag_{t}"] in (("0", "1") if validated else ("not validated",))
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
    model, _ = build_backbone("resnet18", 1)
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
    # The run folder (runs/NAME) or its encoder.pt names the same result as NAME.
    for given in (str(enc.parent), str(enc)):
        assert eval_main(args[:4] + [given] + args[5:-1] + [str(tmp_path / "b2"), "--overwrite"]) == 0, given
        assert json.loads((tmp_path / "b2" / "bundle.json").read_text())["encoder"]["name"] == "run"
    other = tmp_path / "eval2" / "linear"  # evaluated under another name: found by the encoder path it records
    other.mkdir(parents=True)
    for suffix in (".json", ".npz", ".heads.pt"):
        shutil.copy(out / "linear" / f"run{suffix}", other / f"ssl{suffix}")
    assert eval_main(["export", "--out", str(other.parent), "--encoder", str(enc.parent), "--protocol", "linear",
                      "--bundle", str(tmp_path / "b3")]) == 0
    torch.manual_seed(8)
    save_encoder(enc, build_backbone("resnet18", 1)[0], "resnet18", 1, {"config": {}, "step": 0})
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


def _png_file(path: Path) -> Path:
    img = (np.random.default_rng(2).random((90, 120)) * 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def test_chance_level_probe_is_exported_not_validated(bundle, tmp_path, capsys):
    """A probe whose validation AUROC CI does not lie above 0.5 gets no threshold: a warning at export, null
    threshold and validated false in bundle.json, "not validated" in the model card, predict's CSV and serve's
    findings; a probe validated above chance keeps its threshold and 0/1 flags."""
    from eval.bundle import load_bundle
    from eval.predict import Predictor
    from serve.app import _predict_one
    out = tmp_path / "eval"
    shutil.copytree(bundle.parent / "eval" / "linear", out / "linear")
    heads_path = out / "linear" / "random-resnet18.heads.pt"
    heads = torch.load(heads_path, weights_only=True)
    y = heads["val_targets"].numpy()
    two_class = [j for j in range(y.shape[1]) if np.nanmax(y[:, j]) > 0.5 and np.nanmin(y[:, j]) <= 0.5]
    assert len(two_class) >= 2, "the test shards need two tasks with both classes in val"
    good, chance = two_class[:2]
    scores = heads["val_scores"].clone()
    scores[:, good] = torch.from_numpy(np.nan_to_num(y[:, good], nan=0.5))  # separates val perfectly
    scores[:, chance] = 1.6e-17  # one value for every film: AUROC 0.5, the curve has no operating point
    heads["val_scores"] = scores
    torch.save(heads, heads_path)
    tasks = list(heads["tasks"])
    rc = eval_main(["export", "--out", str(out), "--encoder", "random-resnet18", "--protocol", "linear",
                    "--bundle", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"eval export: warning: {tasks[chance]}: not validated: validation AUROC 0.500, 95% CI [0.500, 0.500] " \
           "includes 0.5 (chance level)" in err, err
    assert f"warning: {tasks[good]}:" not in err
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["thresholds"][tasks[chance]]["threshold"] is None
    assert meta["thresholds"][tasks[chance]]["validated"] is False
    assert meta["thresholds"][tasks[chance]]["test_sensitivity"] is None
    assert meta["metrics"][tasks[chance]]["val_auroc_ci"] == [0.5, 0.5]
    assert meta["thresholds"][tasks[good]]["validated"] is True
    assert 0 <= meta["thresholds"][tasks[good]]["threshold"] <= 1
    assert meta["metrics"][tasks[good]]["val_auroc_ci"][0] > 0.5
    card = (tmp_path / "b" / "README.md").read_text()
    assert any(line.startswith(f"| {tasks[chance]} |") and "not validated" in line for line in card.splitlines())

    films = tmp_path / "films"
    films.mkdir()
    _png_file(films / "a.png")
    assert eval_main(["predict", "--bundle", str(tmp_path / "b"), "--input", str(films),
                      "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    row = next(csv.DictReader(open(tmp_path / "p.csv")))
    assert row[f"flag_{tasks[chance]}"] == "not validated" and row[f"flag_{tasks[good]}"] in ("0", "1")
    assert 0 <= float(row[f"p_{tasks[chance]}"]) <= 1  # the score is still shown

    predictor = Predictor(load_bundle(tmp_path / "b"))
    findings = {f["name"]: f for f in _predict_one(predictor, (films / "a.png").read_bytes(), 0, None)["findings"]}
    assert findings[tasks[chance]]["validated"] is False and findings[tasks[chance]]["above_threshold"] is None
    assert findings[tasks[good]]["validated"] is True and isinstance(findings[tasks[good]]["above_threshold"], bool)


def test_predict_without_a_readable_input_exits_non_zero(bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")  # hidden files are not inputs
    rc = eval_main(["predict", "--bundle", str(bundle), "--input", str(empty), "--out", str(tmp_path / "e.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no files to predict" in err, err
    assert not (tmp_path / "e.csv").exists()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("not an image")
    (junk / "b.jpg").write_bytes(b"")
    rc = eval_main(["predict", "--bundle", str(bundle), "--input", str(junk), "--out", str(tmp_path / "j.csv"),
                    "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("eval predict: error: none of the 2 input(s) could be read"), err
    rows = list(csv.DictReader(open(tmp_path / "j.csv")))  # every input listed, with its reason
    assert [r["status"] for r in rows] == ["error", "error"] and all(r["reason"] for r in rows)


def _edit_bundle(bundle: Path, folder: Path, edit) -> Path:
    shutil.copytree(bundle, folder)
    meta = json.loads((folder / "bundle.json").read_text())
    edit(meta)
    (folder / "bundle.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["thresholds"][m["tasks"][0]].pop("validated"), "missing key 'thresholds.{t0}.validated'"),
    (lambda m: m.pop("normalisation"), "missing key 'normalisation'"),
    (lambda m: m["encoder"].update(in_channels="one"), "key 'encoder.in_channels' holds str (int expected)"),
    (lambda m: m["metrics"].pop(m["tasks"][0]), "missing key 'metrics.{t0}'"),
    (lambda m: m.update(format="cxr-ssl-bundle/1"), "bundle format 'cxr-ssl-bundle/1', this code reads"),
])
def test_bundle_with_a_missing_key_is_one_line(bundle, tmp_path, capsys, edit, message):
    from eval.bundle import BundleError, load_bundle
    from serve.__main__ import main as serve_main
    bad = _edit_bundle(bundle, tmp_path / "bad", edit)
    message = message.format(t0=json.loads((bundle / "bundle.json").read_text())["tasks"][0])
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(bad)
    rc = eval_main(["predict", "--bundle", str(bad), "--input", str(_png_file(tmp_path / "a.png")),
                    "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and message in err, err
    assert serve_main(["--bundle", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("serve: error: ") and message in err, err


def test_bundle_model_file_missing_a_tensor_is_one_line(bundle, tmp_path):
    import hashlib

    from eval.bundle import BundleError, load_bundle
    bad = shutil.copytree(bundle, tmp_path / "bad")
    doc = torch.load(bad / "model.pt", weights_only=True)
    del doc["feature_std"]
    torch.save(doc, bad / "model.pt")
    meta = json.loads((bad / "bundle.json").read_text())
    meta["model_sha256"] = hashlib.sha256((bad / "model.pt").read_bytes()).hexdigest()
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"model.pt: missing feature_std$"):
        load_bundle(bad)
    (bad / "model.pt").write_bytes(b"")
    meta["model_sha256"] = hashlib.sha256(b"").hexdigest()
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"model.pt: unreadable \(EOFError\)$"):
        load_bundle(bad)


def test_export_with_a_zero_byte_heads_file_is_one_line(bundle, tmp_path, capsys):
    out = tmp_path / "eval"
    shutil.copytree(bundle.parent / "eval" / "linear", out / "linear")
    (out / "linear" / "random-resnet18.heads.pt").write_bytes(b"")
    rc = eval_main(["export", "--out", str(out), "--encoder", "random-resnet18", "--protocol", "linear",
                    "--bundle", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.endswith("random-resnet18.heads.pt: unreadable (EOFError)"), err
