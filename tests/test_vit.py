"""ViT backbones (timm): 1-channel weight folding, one model for two crop sizes, model.init from timm-named state
dicts with one-line mismatch errors, encoder.pt round trip, and the online kNN monitor's features (CLS token)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.vit import build_vit, read_state, vit_model


def test_gray_folding_matches_rgb_model_on_replicated_gray(tmp_path):
    torch.manual_seed(0)
    rgb = vit_model("vit_tiny_patch16", 3).eval()
    path = tmp_path / "timm.pth"
    state = {k: v for k, v in rgb.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 192), torch.zeros(1000)  # a classifier is dropped
    torch.save(state, path)
    gray, dim = build_vit("vit_tiny_patch16", 1, str(path))
    gray.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    assert dim == 192 and gray.patch_embed.proj.in_channels == 1


def test_one_model_takes_global_and_local_crops():
    model = vit_model("vit_tiny_patch14", 1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 56, 56)).shape == (2, 192)
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 192)
        assert model(torch.randn(1, 1, 30, 30)).shape == (1, 192)  # padded to a patch multiple


def test_init_resamples_position_embeddings_and_reads_dinov2_style_files(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    src = VisionTransformer(img_size=70, patch_size=14, in_chans=3, num_classes=0, embed_dim=192, depth=12,
                            num_heads=3, init_values=1e-5, reg_tokens=0)  # LayerScale as DINOv2, a 5x5 grid
    path = tmp_path / "dinov2.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, path)
    model, _ = build_vit("vit_tiny_patch14", 1, str(path))
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 192)  # resampled to the 224 px grid
    torch.testing.assert_close(model.blocks[3].ls1.gamma, src.blocks[3].ls1.gamma)


def test_mismatch_is_one_line_listing_the_keys(tmp_path):
    state = vit_model("vit_tiny_patch16", 1).state_dict()
    state.pop("blocks.0.attn.qkv.weight")
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        build_vit("vit_tiny_patch16", 1, str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing blocks.0.attn.qkv.weight" in msg and "unexpected extra.weight" in msg
    with pytest.raises(ValueError, match="holds a vit_small_patch16"):
        big = tmp_path / "enc.pt"
        torch.save({"arch": "vit_small_patch16", "in_channels": 1, "state_dict": state}, big)
        build_vit("vit_tiny_patch16", 1, str(big))
    with pytest.raises(ValueError, match="model.init=imagenet"):
        build_vit("vit_tiny_patch16", 1, "imagenet")


def test_encoder_round_trip_and_config_choices(tmp_path):
    from trainer import checkpoint, models
    from trainer.config import ConfigError, load_config
    from trainer.encoder_io import read_encoder

    torch.manual_seed(0)
    backbone, dim = models.build_backbone("vit_tiny_patch8", 1)
    path = checkpoint.save_encoder(tmp_path / "encoder.pt", backbone, "vit_tiny_patch8", 1)
    encoder = read_encoder(path)
    loaded, meta = encoder.model, encoder.meta
    assert meta["feature_dim"] == dim == encoder.feature_dim == 192 and encoder.arch == "vit_tiny_patch8"
    assert read_encoder(tmp_path, arch="vit_tiny_patch8", in_channels=1).feature_dim == 192  # the model.init path
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), backbone.eval()(x))
    state, _ = read_state(path)
    assert set(state) == set(backbone.state_dict())
    assert load_config(None, ["model.arch=vit_base_patch14", "data.source=synthetic"]).model.arch == "vit_base_patch14"
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=vit_huge_patch16", "data.source=synthetic"])


def test_knn_monitor_embeds_with_a_vit():
    from trainer.monitor import KnnMonitor, MonitorSet

    g = torch.Generator().manual_seed(0)
    targets = np.array([[1.0], [0.0]] * 6, dtype=np.float32)
    images = torch.randn(12, 1, 16, 16, generator=g) + torch.from_numpy(targets)[:, :, None, None] * 2
    data = MonitorSet(images=images, targets=targets, pids=np.arange(12), task_names=["a"], decode_s=0.0)
    model = vit_model("vit_tiny_patch8", 1)
    monitor = KnnMonitor(data, k=3, batch_size=5)
    assert monitor.embed(model).shape == (12, 192) and model.training  # CLS features; train mode restored
    row = monitor(model)
    assert 0.0 <= row["knn_auroc_mean"] <= 1.0


def test_frozen_features_cls_mean_both_match_the_tokens():
    from trainer.vit import ViTFeatures

    torch.manual_seed(0)
    model = vit_model("vit_tiny_patch8", 1, reg_tokens=2).eval()  # register tokens are not patch tokens
    x = torch.randn(3, 1, 40, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (3, 1 + 2 + 5*4, 192)
        cls, mean, both = (ViTFeatures(model, f)(x) for f in ("cls", "mean", "both"))
    assert tokens.shape == (3, 23, 192)
    torch.testing.assert_close(cls, model(x))
    torch.testing.assert_close(mean, tokens[:, 3:].mean(1))
    torch.testing.assert_close(both, torch.cat([cls, mean], 1))
    assert [ViTFeatures(model, f).feature_dim for f in ("cls", "mean", "both")] == [192, 192, 384]
    with pytest.raises(ValueError, match="unknown ViT features 'avg'"):
        ViTFeatures(model, "avg")
