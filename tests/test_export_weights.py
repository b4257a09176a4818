"""`python -m eval export-weights`: the exported safetensors + config.json load with the README's own lines into
timm (ResNet, ViT, ViT with LayerScale and register tokens) and torchvision (ResNet) and compute what our encoder
computes; bad input is a one-line exit 2, and an interrupted export leaves no partial file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval.__main__ import main as eval_main
from eval.weights import CONFIG_FILE, TIMM_LOCAL_DIR_SNIPPET, TIMM_SNIPPET, TORCHVISION_SNIPPET, WEIGHTS_FILE
from trainer.checkpoint import save_checkpoint, save_encoder
from trainer.encoder_io import read_encoder

ROOT = Path(__file__).resolve().parents[1]
PERTURBED = ("running_mean", "running_var", "bn", "downsample.1", "ls1", "ls2", "cls_token", "reg_token", "pos_embed")


def _encoder(arch: str, **vit_kw) -> torch.nn.Module:
    """A 1-channel backbone whose normalisation statistics, LayerScale gammas and tokens are not their init values,
    so weights the loader left out would change the output."""
    from trainer.models import build_backbone
    from trainer.vit import vit_model
    torch.manual_seed(0)
    model = vit_model(arch, 1, **vit_kw) if arch.startswith("vit_") else build_backbone(arch, 1)[0]
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and any(p in name for p in PERTURBED):
                t.copy_(torch.rand_like(t) * 0.5 + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    return model.eval()


def _run_snippet(snippet: str, out: Path) -> torch.nn.Module:
    namespace: dict = {}
    exec(snippet.replace("DIR", str(out)), namespace)  # the README's lines, as written, with the folder filled in
    return namespace["model"].eval()


def _assert_same_features(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ours(x), theirs(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def _export(tmp_path: Path, source: Path, *extra: str) -> Path:
    out = tmp_path / "export"
    assert eval_main(["export-weights", "--encoder", str(source), "--out", str(out), *extra]) == 0
    return out


def test_resnet_loads_in_timm_and_torchvision_with_the_readme_lines(tmp_path):
    from safetensors import safe_open

    from ingest.files import sha256_file
    model = _encoder("resnet18")
    enc = save_encoder(tmp_path / "run" / "encoder.pt", model, "resnet18", 1, {"config": {}, "step": 7})
    out = _export(tmp_path, tmp_path / "run")  # a run folder: its encoder.pt
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert (cfg["architecture"], cfg["in_chans"], cfg["num_classes"]) == ("resnet18", 1, 0)
    assert cfg["torchvision"] == {"arch": "resnet18", "in_channels": 1}
    assert cfg["pretrained_cfg"]["input_size"] == [1, 224, 224] and "default" in cfg["source"]["input_size_from"]
    assert cfg["pretrained_cfg"]["mean"] == [pytest.approx(0.4982)] and cfg["pretrained_cfg"]["std"] == [
        pytest.approx(0.2511)]
    assert cfg["source"]["sha256"] == sha256_file(enc) and cfg["source"]["format"] == "cxr-ssl-encoder/1"
    assert cfg["files"][WEIGHTS_FILE]["sha256"] == sha256_file(out / WEIGHTS_FILE)
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["arch"] == "resnet18"
        assert not any(k.startswith("fc.") for k in f.keys())
    for snippet in (TIMM_SNIPPET, TIMM_LOCAL_DIR_SNIPPET, TORCHVISION_SNIPPET):
        loaded = _run_snippet(snippet, out)
        assert loaded.conv1.in_channels == 1
        _assert_same_features(model, loaded)
    assert TIMM_SNIPPET in (out / "README.md").read_text() and TORCHVISION_SNIPPET in (out / "README.md").read_text()


@pytest.mark.parametrize("vit_kw", [{}, {"init_values": 1e-5, "reg_tokens": 4}], ids=["plain", "layerscale-reg4"])
def test_vit_patch8_loads_in_timm_with_the_readme_lines(tmp_path, vit_kw):
    model = _encoder("vit_tiny_patch8", **vit_kw)
    save_encoder(tmp_path / "encoder.pt", model, "vit_tiny_patch8", 1, {"config": {}, "step": 0})
    out = _export(tmp_path, tmp_path / "encoder.pt")
    cfg = json.loads((out / CONFIG_FILE).read_text())
    # timm registers no vit_tiny_patch8 name: the patch-16 name with patch_size overridden
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"]["patch_size"] == 8
    assert cfg["model_args"]["reg_tokens"] == vit_kw.get("reg_tokens", 0) and cfg["torchvision"] is None
    for snippet in (TIMM_SNIPPET, TIMM_LOCAL_DIR_SNIPPET):
        loaded = _run_snippet(snippet, out)
        assert loaded.num_reg_tokens == vit_kw.get("reg_tokens", 0) and loaded.patch_embed.proj.in_channels == 1
        _assert_same_features(model, loaded)


def test_training_checkpoint_exports_its_backbone_and_image_size(tmp_path):
    model = _encoder("resnet18")
    state = {"model": {f"backbone.{k}": v for k, v in model.state_dict().items()}, "step": 500,
             "config": {"model": {"arch": "resnet18", "in_channels": 1}, "data": {"image_size": 64}}}
    ckpt = save_checkpoint(tmp_path / "run", 500, state)
    out = _export(tmp_path, ckpt, "--arch", "resnet18")
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [1, 64, 64] and cfg["source"]["format"] == "training checkpoint"
    assert cfg["source"]["step"] == 500
    _assert_same_features(model, _run_snippet(TIMM_SNIPPET, out))
    _assert_same_features(read_encoder(ckpt).model.eval(), _run_snippet(TORCHVISION_SNIPPET, out))


def test_bad_encoder_and_existing_export_are_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope" / "encoder.pt"
    assert eval_main(["export-weights", "--encoder", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval export-weights: error:") and str(missing) in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    save_encoder(tmp_path / "encoder.pt", _encoder("resnet18"), "resnet18", 1)
    out = _export(tmp_path, tmp_path / "encoder.pt")
    capsys.readouterr()
    assert eval_main(["export-weights", "--encoder", str(tmp_path / "encoder.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--overwrite" in err and "\n" not in err
    assert eval_main(["export-weights", "--encoder", str(tmp_path / "encoder.pt"), "--arch", "resnet50",
                      "--out", str(tmp_path / "o")]) == 2
    assert "resnet18" in capsys.readouterr().err


def test_an_interrupted_export_leaves_complete_files_only(tmp_path, monkeypatch, capsys):
    import ingest.files
    save_encoder(tmp_path / "a.pt", _encoder("resnet18"), "resnet18", 1)
    out = _export(tmp_path, tmp_path / "a.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = ingest.files.os.replace

    def failing_replace(src, dst):
        if Path(dst).name == WEIGHTS_FILE:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ingest.files.os, "replace", failing_replace)
    save_encoder(tmp_path / "b.pt", _encoder("resnet34"), "resnet34", 1)
    code = eval_main(["export-weights", "--encoder", str(tmp_path / "b.pt"), "--out", str(out), "--overwrite"])
    assert code == 2 and "No space left" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp file, nothing half-replaced


def test_the_readme_shows_the_tested_lines():
    readme = (ROOT / "README.md").read_text()
    for snippet in (TIMM_SNIPPET, TIMM_LOCAL_DIR_SNIPPET, TORCHVISION_SNIPPET):
        assert snippet in readme
    assert "python -m eval export-weights" in readme
