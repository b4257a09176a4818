"""The method registry (`trainer.methods`): exactly SimCLR, MoCo v2, MICLe and DINO, each answering the interface the
trainer calls (loader needs, model parts, config rules, the step), and one-line errors for what a method refuses."""
from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.methods import DINO, METHODS, MICLe, MoCoV2, SimCLR, build_method
from trainer.methods.moco import MoCo
from trainer.optim import build_optimizer
from trainer.steps import TrainStep

TINY = ["data.source=synthetic", "data.batch_size=8", "data.image_size=32", "model.arch=resnet18",
        "model.proj_dim=16", "loss.moco_queue=16", "loss.moco_bn_splits=2", "optim.total_steps=1",
        "loss.dino_out_dim=64", "loss.dino_hidden_dim=32", "loss.dino_bottleneck_dim=16"]


def test_registry_holds_exactly_the_four_methods():
    assert METHODS == {"simclr": SimCLR, "moco": MoCoV2, "micle": MICLe, "dino": DINO}
    assert all(cls.name == name for name, cls in METHODS.items())


def test_unknown_method_is_a_one_line_config_error_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.method=byol"])
    msg = str(e.value)
    assert "\n" not in msg and "loss.method" in msg and "byol" in msg
    assert all(name in msg for name in ("simclr", "moco", "micle"))


@pytest.mark.parametrize("overrides, words", [
    (["loss.method=moco", "optim.micro_batch=4"], "optim.micro_batch"),
    (["loss.method=moco", "loss.moco_queue=12"], "loss.moco_queue=12 must be a multiple of data.batch_size=8"),
])
def test_moco_config_rules_are_one_line_errors(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, TINY + overrides)
    load_config(None, TINY + ["loss.method=simclr", "optim.micro_batch=4", "loss.moco_queue=12"])  # SimCLR's own


def test_loader_needs_and_batchnorm_defaults():
    assert [cls.micle_pairs for cls in (SimCLR, MoCoV2, MICLe)] == [False, False, True]
    assert [cls.global_bn_default for cls in (SimCLR, MoCoV2, MICLe)] == [True, False, True]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_builds_its_model_and_takes_a_step(name):
    cfg = load_config(None, TINY + [f"loss.method={name}"])
    method = build_method(cfg.loss)
    assert method.check_run(cfg, 1, torch.device("cpu")) is None
    model = method.build_model(cfg.model, world_size=1)
    assert isinstance(model, MoCo) is (name == "moco")
    exported = {"moco": lambda: model.encoder_q.backbone, "dino": lambda: model.teacher.backbone}
    assert method.backbone(model) is exported.get(name, lambda: model.backbone)()
    assert (method.ntxent is None) is (name in ("moco", "dino"))
    step = TrainStep(model, model, build_optimizer(model, cfg.optim, 0.1), cfg.loss, precision="fp32",
                     device=torch.device("cpu"), method=method)
    g = torch.Generator().manual_seed(0)
    batch = {"view1": torch.randn(8, 1, 32, 32, generator=g), "view2": torch.randn(8, 1, 32, 32, generator=g),
             "pids": torch.arange(8)}
    before = [p.detach().clone() for p in method.backbone(model).parameters()]
    loss = step(batch, 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.backbone(model).parameters()))
    if name == "moco":  # the queue took the step's keys
        assert int(model.queue_ptr) == 8
    assert ("micle_multi_instance" in method.log_fields(object())) is (name == "micle")


def test_moco_refuses_a_batch_its_batchnorm_chunks_cannot_split():
    cfg = load_config(None, TINY + ["loss.method=moco", "loss.moco_bn_splits=8"])
    reason = MoCoV2(cfg.loss).check_run(cfg, 1, torch.device("cpu"))
    assert reason and "loss.moco_bn_splits=8" in reason and "\n" not in reason
    assert MoCoV2(cfg.loss).check_run(cfg, 2, torch.device("cpu")) is None  # several ranks shuffle across ranks
