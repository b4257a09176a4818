"""trainer.encoder_io: one reader for every encoder source (encoder.pt, run folder, step-*.pt, seeded random, cached
ImageNet), each bad file a one-line error naming it; the trainer's model.init reads through it."""
from __future__ import annotations

import pytest
import torch

from trainer.checkpoint import save_checkpoint, save_encoder
from trainer.config import load_config, to_dict
from trainer.encoder_io import EncoderError, encoder_from_state, imagenet_weights_path, read_encoder, read_init
from trainer.models import build_backbone, build_contrastive_model, torchvision_resnet


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def _one_line(info) -> str:
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(3)
    return build_backbone("resnet18", 1)[0]


def test_encoder_file_and_run_folder(backbone, tmp_path):
    run = tmp_path / "run"
    save_encoder(run / "encoder.pt", backbone, "resnet18", 1, {"step": 7, "config": {"x": 1}})
    for source in (run / "encoder.pt", run, str(run)):
        enc = read_encoder(source)
        assert (enc.kind, enc.arch, enc.in_channels, enc.feature_dim) == ("encoder", "resnet18", 1, 512)
        assert enc.path == run / "encoder.pt" and enc.meta["step"] == 7 and "state_dict" not in enc.meta
        assert isinstance(enc.model.fc, torch.nn.Identity)
        _same_weights(enc.model, backbone)
    assert read_encoder(run, arch="resnet18", in_channels=1).arch == "resnet18"
    with pytest.raises(EncoderError) as info:
        read_encoder(run, arch="resnet34")
    assert _one_line(info).endswith("encoder.pt: encoder is resnet18 with 1 input channel(s), but resnet34 with 1 "
                                    "was requested")
    with pytest.raises(EncoderError) as info:
        read_encoder(run, in_channels=3)
    assert "encoder is resnet18 with 1 input channel(s), but resnet18 with 3 was requested" in _one_line(info)
    (tmp_path / "empty-run").mkdir()  # a run folder that has not exported its encoder yet
    with pytest.raises(EncoderError) as info:
        read_encoder(tmp_path / "empty-run")
    assert _one_line(info) == f"{tmp_path / 'empty-run' / 'encoder.pt'}: checkpoint not found"


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_training_checkpoint(backbone, tmp_path, method):
    cfg = load_config(None, ["data.source=synthetic", "model.arch=resnet18", f"loss.method={method}",
                             "loss.moco_queue=16", "data.batch_size=4"])
    model = build_contrastive_model(cfg.model, read_encoder("random", arch="resnet18", in_channels=1, seed=0))
    model.backbone.load_state_dict(backbone.state_dict())
    prefix = "encoder_q." if method == "moco" else ""  # MoCo keeps the query encoder under encoder_q
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "run", 5, {"model": state, "optimizer": {}, "step": 5, "config": to_dict(cfg)})
    enc = read_encoder(path, arch="resnet18", in_channels=1)
    assert (enc.kind, enc.path, enc.meta["step"], enc.feature_dim) == ("training", path, 5, 512)
    _same_weights(enc.model, backbone)


def test_seeded_random_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = read_encoder("random", arch="resnet18", in_channels=1, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    b = read_encoder("random", arch="resnet18", in_channels=1, seed=4)
    _same_weights(a.model, b.model)
    c = read_encoder("random", arch="resnet18", in_channels=1, seed=5)
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight)
    assert (a.kind, a.path, a.feature_dim, a.model.conv1.in_channels) == ("random", None, 512, 1)
    with pytest.raises(EncoderError, match="needs an arch and in_channels"):
        read_encoder("random", arch="resnet18")
    with pytest.raises(EncoderError, match="unknown arch 'resnet9'"):
        read_encoder("random", arch="resnet9", in_channels=1)
    with pytest.raises(EncoderError, match="in_channels must be 1 or 3, got 2"):
        read_encoder("random", arch="resnet18", in_channels=2)


def test_imagenet_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(EncoderError) as info:
        read_encoder("imagenet", arch="resnet18", in_channels=1)
    text = _one_line(info)
    assert "local torch hub cache" in text and "no network access" in text and str(tmp_path / "hub") in text
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    with pytest.raises(EncoderError) as info:
        read_encoder("imagenet", arch="resnet18", in_channels=3)
    assert _one_line(info) == f"{path}: not a readable checkpoint (EOFError)"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(EncoderError) as info:
        read_encoder("imagenet", arch="resnet18", in_channels=3)
    assert _one_line(info).startswith(f"{path}: not the ImageNet weights of resnet18 (")
    rgb = torchvision_resnet("resnet18", in_channels=3)
    torch.save(rgb.state_dict(), path)
    gray = read_encoder("imagenet", arch="resnet18", in_channels=1)
    assert (gray.kind, gray.path, gray.feature_dim) == ("imagenet", path, 512)
    torch.testing.assert_close(gray.model.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))


def test_bad_files_are_one_line(backbone, tmp_path):
    empty = tmp_path / "zero.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    bad_run = tmp_path / "ckpt.pt"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(1)}, "config": {}}, bad_run)  # no model.arch
    wrong = tmp_path / "wrong.pt"
    save_encoder(wrong, backbone, "resnet34", 1)  # declares a model its weights do not fit
    cases = {empty: f"{empty}: not a readable checkpoint (EOFError)", junk: f"{junk}: not an encoder (",
             bad_run: f"{bad_run}: not an encoder (", wrong: f"{wrong}: weights do not match resnet34 with 1 channel"}
    for path, start in cases.items():
        with pytest.raises(EncoderError) as info:
            read_encoder(path)
        assert _one_line(info).startswith(start)
    with pytest.raises(EncoderError) as info:
        encoder_from_state({"fc.weight": torch.zeros(1)}, "resnet18", 1, source="bundle/model.pt")
    assert _one_line(info).startswith("bundle/model.pt: weights do not match resnet18 with 1 channel(s) (")


def test_model_init_reads_through_the_reader(backbone, tmp_path):
    save_encoder(tmp_path / "run" / "encoder.pt", backbone, "resnet18", 1)
    cfg = load_config(None, ["data.source=synthetic", "model.arch=resnet18", f"model.init={tmp_path / 'run'}"])
    model = build_contrastive_model(cfg.model, read_init(cfg.model))
    _same_weights(model.backbone, backbone)
    with pytest.raises(ValueError, match="read it with trainer.encoder_io.read_init"):
        build_contrastive_model(cfg.model)  # a non-random init is never silently replaced by a random one
    cfg = load_config(None, ["data.source=synthetic", "model.arch=resnet34", f"model.init={tmp_path / 'run'}"])
    with pytest.raises(EncoderError, match="encoder is resnet18 with 1 input channel"):
        read_init(cfg.model)
