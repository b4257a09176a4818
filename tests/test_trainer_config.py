"""Trainer config (parsing, precedence, errors, presets), lr schedules and LARS parameter exclusions."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from trainer.config import ConfigError, load_config, split_argv, to_toml
from trainer.optim import LARS, build_optimizer, param_groups
from trainer.schedules import scaled_lr, warmup_cosine

CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_precedence_defaults_file_overrides(tmp_path):
    path = _write(tmp_path, '[data]\nshards = "/x"\nbatch_size = 64\n[optim]\nbase_lr = 1\n[loss]\ntemperature = 0.5\n')
    cfg = load_config(path, ["data.batch_size=32", "loss.temperature=0.07", "run.deterministic=true",
                             "optim.betas=[0.8, 0.9]"])
    assert cfg.data.batch_size == 32 and cfg.loss.temperature == 0.07  # override beats file
    assert cfg.optim.base_lr == 1.0 and isinstance(cfg.optim.base_lr, float)  # TOML int widened to float
    assert cfg.data.image_size == 224  # default kept
    assert cfg.run.deterministic is True and cfg.optim.betas == [0.8, 0.9]
    later = load_config(path, ["data.batch_size=32", "data.batch_size=16"])
    assert later.data.batch_size == 16  # overrides apply in order


@pytest.mark.parametrize("text,overrides,needle", [
    ('[data]\nshards = "/x"\nbatchsize = 3\n', [], "unknown key data.batchsize"),
    ('[dat]\nshards = "/x"\n', [], "unknown section [dat]"),
    ('[data]\nshards = "/x"\nbatch_size = "big"\n', [], "data.batch_size: expected int"),
    ('[data]\nshards = "/x"\nbatch_size = 2.5\n', [], "expected int"),
    ('[run]\ndeterministic = 1\n[data]\nshards = "/x"\n', [], "expected bool"),
    ('[data]\nshards = "/x"\n', ["data.batch_size=ten"], "cannot read 'ten' as int"),
    ('[data]\nshards = "/x"\n', ["model.arch=vgg16"], "model.arch = 'vgg16' is not one of"),
    ('[data]\nshards = "/x"\n', ["run.seed"], "expected section.key=value"),
    ('[data]\nshards = "/x"\n', ["loss.temperature=0"], "loss.temperature must be > 0"),
    ('[data]\n', [], "data.shards is required"),
    ('[data\nshards = 1', [], "not valid TOML"),
    ('[data]\nshards = "/x"\n', ['optim.betas=["a", 0.9]'], "optim.betas must be two numbers"),
    ('[data]\nshards = "/x"\n[optim]\nbetas = 0.9\n', [], "optim.betas: expected list"),
])
def test_bad_config_is_one_line_error(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text), overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_argv_split(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    assert split_argv(["a.toml", "run.seed=3"]) == ("a.toml", ["run.seed=3"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        split_argv(["a.toml", "b.toml"])


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_presets_load_and_round_trip(tmp_path, preset):
    cfg = load_config(CONFIGS / preset, ["data.shards=/somewhere"])
    again = load_config(_write(tmp_path, to_toml(cfg)))
    assert again == cfg


def test_required_presets_exist():
    names = {p.stem for p in CONFIGS.glob("*.toml")}
    assert {"simclr_r50_chexpert", "mocov2_r50", "micle_r50", "debug_cpu"} <= names
    simclr = load_config(CONFIGS / "simclr_r50_chexpert.toml", ["data.shards=/x"])
    assert simclr.optim.name == "lars" and simclr.optim.base_lr == 0.3 and simclr.optim.lr_scaling == "linear"
    assert simclr.optim.warmup_epochs == 10 and simclr.model.arch == "resnet50"
    moco = load_config(CONFIGS / "mocov2_r50.toml", ["data.shards=/x"])
    assert (moco.loss.method, moco.loss.moco_queue, moco.loss.moco_momentum, moco.loss.temperature,
            moco.model.head_layers) == ("moco", 65536, 0.999, 0.2, 2)
    assert moco.loss.moco_shuffle_bn and moco.data.batch_size % moco.loss.moco_bn_splits == 0  # one-GPU shuffle-BN
    assert not moco.model.head_bn and moco.model.proj_dim == 128  # MoCo v2: Linear-ReLU-Linear to 128
    micle = load_config(CONFIGS / "micle_r50.toml", ["data.shards=/x"])
    assert micle.loss.method == "micle" and micle.data.views == "all"
    debug = load_config(CONFIGS / "debug_cpu.toml", ["data.shards=/x"])
    assert debug.run.device == "cpu" and debug.run.deterministic and debug.model.compile == "off"


def test_scaled_lr_and_warmup_cosine():
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    lrs = [warmup_cosine(s, **kw) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear ramp reaches the peak
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(b <= a for a, b in zip(lrs[10:109], lrs[11:110]))  # monotone decay
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == lrs[119] == pytest.approx(0.1)
    assert warmup_cosine(0, peak_lr=2.0, warmup_steps=0, total_steps=5) == pytest.approx(2.0)


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_lars_excludes_bn_and_bias():
    net = _net()
    regular, excluded, names = param_groups(net)
    assert sorted(names) == ["0.bias", "1.bias", "1.weight", "3.bias"]  # conv/linear biases, both BN tensors
    assert [tuple(p.shape) for p in regular] == [(4, 1, 3, 3), (3, 64)]
    opt = build_optimizer(net, load_config(None, ["data.source=synthetic"]).optim, lr=1.0)
    assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_lars_update_rule():
    torch.manual_seed(0)
    net = _net()
    cfg = load_config(None, ["data.source=synthetic", "optim.weight_decay=0.01", "optim.trust_coefficient=0.001",
                             "optim.momentum=0.9"]).optim
    opt = build_optimizer(net, cfg, lr=0.5)
    assert isinstance(opt, LARS)
    expected = {n: p.detach().clone() for n, p in net.named_parameters()}
    velocity = {}
    for _ in range(3):  # momentum accumulates across steps
        opt.zero_grad()
        net(torch.randn(2, 1, 6, 6)).sum().backward()
        for n, p in net.named_parameters():
            w, g = expected[n], p.grad
            if p.ndim <= 1:  # excluded: plain momentum SGD, no decay, no trust ratio
                d = g
            else:
                d = g + 0.01 * w
                d = (0.001 * w.norm() / d.norm()) * d
            velocity[n] = d if n not in velocity else 0.9 * velocity[n] + d
            expected[n] = w - 0.5 * velocity[n]
        opt.step()
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n], msg=n)


def test_sgd_adamw_no_decay_on_excluded():
    net = _net()
    for name in ("sgd", "adamw"):
        cfg = load_config(None, ["data.source=synthetic", f"optim.name={name}", "optim.weight_decay=0.1"]).optim
        opt = build_optimizer(net, cfg, lr=0.1)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_every_config_key_is_documented():
    import dataclasses

    from trainer.config import Config

    readme = (CONFIGS.parent / "README.md").read_text()
    missing = [f"{sec.name}.{f.name}" for sec in dataclasses.fields(Config)
               for f in dataclasses.fields(sec.default_factory) if f"`{sec.name}.{f.name}`" not in readme]
    assert not missing, f"trainer/README.md does not document {missing}"
