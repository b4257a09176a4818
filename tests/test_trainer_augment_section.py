"""The [augment] config section: mirrors dali_pipes.AugmentConfig, preset + overrides, every field resolved into the
run's config.toml, one-line errors, and the loader built from it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dali_pipes.augment import AugmentConfig
from trainer.augment_section import AugmentSection, augment_config
from trainer.config import ConfigError, load_config, to_toml
from trainer.data import build_loader

BASE = ["data.shards=/nonexistent"]


def test_section_mirrors_every_augment_config_field():
    mine = {f.name for f in dataclasses.fields(AugmentSection)}
    theirs = {f.name for f in dataclasses.fields(AugmentConfig)}
    assert mine == theirs - {"name"} | {"preset"}
    assert augment_config(AugmentSection()) == AugmentConfig.preset("simclr-cxr")  # defaults are the default preset


@pytest.mark.parametrize("preset", AugmentConfig.PRESETS)
def test_each_preset_resolves_to_its_augment_config(preset):
    cfg = load_config(None, [*BASE, f"augment.preset={preset}"])
    assert augment_config(cfg.augment) == AugmentConfig.preset(preset)


def test_explicit_keys_win_over_the_preset_and_every_field_is_in_the_resolved_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nshards = "x"\n\n[augment]\npreset = "azizi"\nhflip_prob = 0.0\n')
    cfg = load_config(path, ["augment.crop_scale_min=0.3", "augment.blur_prob=0", "augment.blur_sigma=[0.5, 1]"])
    want = AugmentConfig.preset("azizi", hflip_prob=0.0, crop_scale_min=0.3, blur_prob=0.0, blur_sigma=(0.5, 1.0))
    assert augment_config(cfg.augment) == want
    assert cfg.augment.rotation_deg == 45.0  # the preset's value for a key not given
    text = to_toml(cfg)
    section = text.split("[augment]\n", 1)[1]
    for f in dataclasses.fields(AugmentSection):
        assert f"\n{f.name} = " in "\n" + section, f.name
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(text)
    assert load_config(resolved) == cfg  # the run folder's config reproduces the run


@pytest.mark.parametrize("override, message", [
    ("data.augment=azizi", "data.augment moved to the [augment] section: use augment.preset"),
    ("augment.preset=nope", "augment.preset = 'nope' is not one of"),
    ("augment.blur_prob=1.5", "AugmentConfig.blur_prob=1.5 is not a probability"),
    ("augment.crop_ratio=[1.0]", "augment.crop_ratio must be two numbers"),
    ("augment.hflip=0.5", "unknown key augment.hflip"),
    ("augment.random_crop=maybe", "cannot read 'maybe' as bool"),
])
def test_bad_augment_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BASE, override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_loader_gets_the_resolved_augmentation(tiny_shards):
    cfg = load_config(None, [f"data.shards={tiny_shards}", "data.image_size=32", "data.views=all",
                             "augment.preset=moco-cxr", "augment.rotation_deg=5"])
    loader = build_loader(cfg.data, cfg.model, cfg.loss, augment=augment_config(cfg.augment), per_rank_batch=2,
                          rank=0, world_size=1, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    assert loader.cfg == AugmentConfig.preset("moco-cxr", rotation_deg=5.0)
    batch = next(iter(loader))
    assert batch["view1"].shape == (2, 1, 32, 32)
