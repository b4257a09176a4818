"""A ViT encoder through eval, export, predict and serve on CPU (vit_tiny_patch8 at 32 px: a 4 x 4 patch grid):
the --vit-features choice in the feature cache key and the results, a ViT bundle's probabilities against the heads
on independently computed ViTFeatures, its attention map against timm's own attention weights, the mean-token CAM,
bundle validation of the choice, and the page's saliency label."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from eval.__main__ import main as eval_main

ARCH = "vit_tiny_patch8"
FAST = ["--image-size", "32", "--batch-size", "16", "--bootstrap", "100"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards, a seeded ViT encoder.pt (as a DINO run writes it), and `eval linear` of it with CLS and with mean
    features into two eval folders sharing one feature cache."""
    from shardgen import make_shards
    from trainer.checkpoint import save_encoder
    from trainer.vit import vit_model
    root = tmp_path_factory.mktemp("vit")
    shards = make_shards(root / "shards", num_patients=36, size_px=48, seed=3)
    torch.manual_seed(11)
    enc = root / "dino-run" / "encoder.pt"
    enc.parent.mkdir()
    save_encoder(enc, vit_model(ARCH, 1), ARCH, 1, {"config": {}, "step": 0})
    for features in ("cls", "mean"):
        rc = eval_main(["linear", "--shards", str(shards), "--out", str(root / f"eval-{features}"), "--encoder",
                        str(enc), "--cache", str(root / "cache"), "--vit-features", features, *FAST])
        assert rc == 0, f"eval linear --vit-features {features} failed"
    return root, shards, enc


def _export(root, features: str):
    bundle = root / f"bundle-{features}"
    if not bundle.exists():
        assert eval_main(["export", "--out", str(root / f"eval-{features}"), "--encoder", "dino-run",
                          "--protocol", "linear", "--bundle", str(bundle)]) == 0
    return bundle


def _test_images(shards, view: dict, norm: dict) -> torch.Tensor:
    from eval.predict import view_tensor
    from ingest.schema import load_manifest
    from ingest.shards import iter_shard
    return torch.stack([view_tensor(np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L")), view, norm, 1)
                        for sh in load_manifest(shards).shards("test") for s in iter_shard(sh.path)])


def _vit(enc):
    from trainer.encoder_io import read_encoder
    return read_encoder(enc).model.eval()


def test_feature_choice_is_part_of_the_cache_key_and_the_result(setup):
    from eval.arg_types import VIT_FEATURES as ARG_CHOICES
    from eval.features import Transform, encoder_spec, feature_cache_key
    from trainer.vit import VIT_FEATURES, ViTFeatures
    root, shards, enc = setup
    assert ARG_CHOICES == VIT_FEATURES  # spelled out for the parser (no torch import); kept equal here
    cls, mean = (encoder_spec(enc, vit_features=f) for f in ("cls", "mean"))
    assert encoder_spec(enc).vit_features == "cls" and mean.vit_features == "mean"
    t = Transform(32, 37)
    assert feature_cache_key(cls, shards, "val", t) != feature_cache_key(mean, shards, "val", t)
    cached = sorted((root / "cache").glob("dino-run-val-*.npz"))
    assert len(cached) == 2  # one entry per choice, never shared
    with np.load(cached[0]) as a, np.load(cached[1]) as b:
        assert a["features"].shape == b["features"].shape == (len(a["pids"]), 192)
        assert not np.allclose(a["features"], b["features"])
    # The mean entry holds the mean patch token of the images (DALI's view; the torch view differs by resize kernel).
    entry = next(p for p in cached if feature_cache_key(mean, shards, "val", t) in p.name)
    with np.load(entry) as z:
        cached_mean = z["features"]
    for features in ("cls", "mean"):
        result = json.loads((root / f"eval-{features}" / "linear" / "dino-run.json").read_text())
        assert result["encoder"]["vit_features"] == features and result["encoder"]["arch"] == ARCH
    from eval.features import extract_features
    fresh = extract_features(mean, shards, "val", transform=t, batch_size=8, cache_dir=None)
    np.testing.assert_allclose(fresh.features, cached_mean, atol=1e-4)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        vit = _vit(enc)
        tokens = vit.forward_features(x)
        torch.testing.assert_close(ViTFeatures(vit, "mean")(x), tokens[:, 1:].mean(1))


def test_vit_features_with_a_resnet_is_one_line(setup, tmp_path, capsys):
    _, shards, _ = setup
    rc = eval_main(["linear", "--shards", str(shards), "--out", str(tmp_path / "e"), "--init", "random",
                    "--arch", "resnet18", "--vit-features", "mean", *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--vit-features mean applies to vit_* encoders only" in err, err


def test_bundle_probabilities_are_the_heads_on_vit_features(setup):
    from eval.bundle import load_bundle
    from eval.predict import Predictor
    from trainer.vit import ViTFeatures
    root, shards, enc = setup
    for features in ("cls", "mean"):
        b = load_bundle(_export(root, features))
        assert b.meta["encoder"]["vit_features"] == features and b.vit_features == features
        assert b.saliency == ("cam" if features == "mean" else "attention")
        card = (b.folder / "README.md").read_text()
        assert f"ViT features: the {'CLS token' if features == 'cls' else 'mean'}" in card
        x = _test_images(shards, b.meta["view"], b.meta["normalisation"])
        out = Predictor(b).predict(x)
        doc = torch.load(b.folder / "model.pt", weights_only=True)
        with torch.no_grad():
            feats = ViTFeatures(_vit(enc), features)(x)
        logits = (feats - doc["feature_mean"]) / doc["feature_std"] @ doc["head_weight"].T + doc["head_bias"]
        np.testing.assert_allclose(out.probs, torch.sigmoid(logits).double().numpy(), atol=1e-5)
        np.testing.assert_allclose(out.features, feats.numpy(), atol=1e-5)
        assert out.saliency == b.saliency and out.cams.shape == (len(x), len(b.tasks), 4, 4)
        # The bundle reproduces eval linear's stored test scores. Those came through DALI's resize, whose kernel
        # differs slightly from the bundle's (and by CPU: up to 0.053 on one score of an untrained 32 px ViT), so the
        # typical score must agree closely and none may be far off; a wrong head or task order fails both.
        with np.load(root / f"eval-{features}" / "linear" / "dino-run.npz") as z:
            names = [str(t) for t in z["tasks"]]
            ref = z["scores"][:, [names.index(t) for t in b.tasks]]
        gap = np.abs(out.probs - ref)
        assert np.median(gap) < 0.005 and gap.max() < 0.1, (np.median(gap), gap.max())


def test_attention_map_is_the_last_blocks_cls_attention(setup):
    """cls bundle: the map equals timm's own (non-fused) softmax weights of the last block, CLS row, patches only,
    averaged over heads and renormalised; a distribution over the 16 patches, the same for every task."""
    from eval.bundle import load_bundle
    from eval.predict import Predictor
    root, shards, enc = setup
    b = load_bundle(_export(root, "cls"))
    x = _test_images(shards, b.meta["view"], b.meta["normalisation"])[:6]
    out = Predictor(b).predict(x)
    vit = _vit(enc)
    attn = vit.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path: softmax(q k^T * scale) passes through attn_drop
    seen = []
    attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        vit(x)
    weights = seen[0]  # (B, heads, N, N)
    cls_to_patch = weights[:, :, 0, vit.num_prefix_tokens:].mean(1)
    expected = (cls_to_patch / cls_to_patch.sum(1, keepdim=True)).numpy()
    maps = out.cams.reshape(len(x), len(b.tasks), 16)
    assert (maps >= 0).all() and np.allclose(maps.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(maps[:, 0], expected, atol=1e-5)
    assert all(np.array_equal(maps[:, 0], maps[:, j]) for j in range(len(b.tasks)))
    assert not np.allclose(maps[0, 0], maps[1, 0])  # depends on the image


def test_mean_token_bundle_has_a_true_class_activation_map(setup):
    """mean bundle: the CAM's patch average is the logit up to the head's constant (linear head on pooled tokens)."""
    from eval.bundle import load_bundle
    from eval.predict import Predictor
    root, shards, _ = setup
    b = load_bundle(_export(root, "mean"))
    x = _test_images(shards, b.meta["view"], b.meta["normalisation"])[:6]
    out = Predictor(b).predict(x)
    h = b.model.heads
    const = (h.bias - (h.mean / h.std) @ h.weight.T).numpy()
    logits = out.cams.mean(axis=(2, 3)) + const
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), out.probs, atol=1e-5)
    assert not np.allclose(out.cams[:, 0], out.cams[:, 1])  # a map per task


@pytest.mark.parametrize("arch, value, message", [
    (ARCH, "max", "encoder.vit_features 'max' is not one of cls, mean, both"),
    (ARCH, None, "encoder.vit_features None is not one of cls, mean, both"),
    ("resnet18", "cls", "encoder.vit_features 'cls' given for a resnet18 (vit_* only)"),
])
def test_bundle_feature_choice_is_validated(setup, tmp_path, capsys, arch, value, message):
    from eval.bundle import BundleError, load_bundle
    root, _, _ = setup
    bad = shutil.copytree(_export(root, "cls"), tmp_path / "bad")
    meta = json.loads((bad / "bundle.json").read_text())
    meta["encoder"].update(arch=arch, vit_features=value)
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        load_bundle(bad)
    png = tmp_path / "a.png"
    Image.fromarray(np.full((60, 50), 90, np.uint8)).save(png)
    rc = eval_main(["predict", "--bundle", str(bad), "--input", str(png), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and message in err, err


def test_predict_cli_with_a_vit_bundle(setup, tmp_path, capsys):
    root, _, _ = setup
    bundle = _export(root, "cls")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((80, 64)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert eval_main(["predict", "--bundle", str(bundle), "--input", str(folder), "--out", str(tmp_path / "p.csv"),
                      "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    tasks = json.loads((bundle / "bundle.json").read_text())["tasks"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    assert all(0 <= float(r[f"p_{t}"]) <= 1 for r in rows[:3] for t in tasks)


def test_page_json_labels_the_attention_map(setup):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from eval.bundle import SALIENCY_TEXT, load_bundle
    from eval.predict import Predictor
    from serve.app import ServeConfig, create_app
    from serve.neighbours import NeighbourIndex
    root, shards, _ = setup
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((120, 100)) * 255).astype(np.uint8)).save(buf, format="PNG")
    for features, method in (("cls", "attention"), ("mean", "cam")):
        predictor = Predictor(load_bundle(_export(root, features)))
        index = NeighbourIndex.build(predictor, shards, log=lambda m: None)
        client = TestClient(create_app(predictor, ServeConfig(k=2), index))
        r = client.post("/api/predict", files={"file": ("x.png", buf.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["saliency_method"] == SALIENCY_TEXT[method] and j["model"]["vit_features"] == features
        assert set(j["saliency"]) == set(predictor.bundle.tasks) and len(j["neighbours"]) == 2
        if method == "attention":
            assert "attention map" in j["saliency_method"] and len(set(j["saliency"].values())) == 1
    assert "attention" not in SALIENCY_TEXT["cam"]


def test_finetuned_vit_exports_with_its_feature_choice(setup, tmp_path):
    """`eval finetune --vit-features mean` saves timm names (no ViTFeatures prefix); its bundle reproduces the
    fine-tuned test scores and records the choice."""
    from eval.bundle import load_bundle
    from eval.predict import Predictor
    root, shards, enc = setup
    out = tmp_path / "eval"
    assert eval_main(["finetune", "--shards", str(shards), "--out", str(out), "--encoder", str(enc),
                      "--vit-features", "mean", "--epochs", "1", *FAST]) == 0
    saved = torch.load(out / "finetune" / "dino-run.pt", weights_only=True)
    assert saved["vit_features"] == "mean" and "pos_embed" in saved["backbone"]
    assert eval_main(["export", "--out", str(out), "--encoder", "dino-run", "--protocol", "finetune",
                      "--bundle", str(tmp_path / "b")]) == 0
    b = load_bundle(tmp_path / "b")
    assert b.vit_features == "mean" and b.saliency == "cam"
    probs = Predictor(b).predict(_test_images(shards, b.meta["view"], b.meta["normalisation"])).probs
    with np.load(out / "finetune" / "dino-run.npz") as z:
        names = [str(t) for t in z["tasks"]]
        ref = z["scores"][:, [names.index(t) for t in b.tasks]]
    assert np.abs(probs - ref).max() < 0.05, np.abs(probs - ref).max()


def test_report_and_compare_name_the_feature_choice(setup, tmp_path):
    # CLS against mean-token features of one encoder: a comparison worth making, so it is recorded, not refused.
    root, _, _ = setup
    out = tmp_path / "e"
    (out / "linear").mkdir(parents=True)
    for features in ("cls", "mean"):
        for ext in ("json", "npz"):
            src = root / f"eval-{features}" / "linear" / f"dino-run.{ext}"
            shutil.copy(src, out / "linear" / f"dino-{features}.{ext}")
    assert eval_main(["compare", "--out", str(out), "--a", "dino-cls", "--b", "dino-mean", "--bootstrap", "50"]) == 0
    doc = json.loads((out / "compare" / "dino-cls-vs-dino-mean-linear.json").read_text())
    assert (doc["a_vit_features"], doc["b_vit_features"]) == ("cls", "mean")
    assert eval_main(["report", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert f"({ARCH}, CLS token)" in md and f"({ARCH}, mean patch token)" in md
    assert "| dino-cls (CLS token) | dino-mean (mean patch token) | linear |" in md
