"""dali_pipes.labelled: fine-tuning batches cover the chosen patients' images exactly once per epoch, in an order
reshuffled every epoch (reproducible per (seed, epoch)), with each image's own labels, through the dali_pipes
augmentation graph; eval.finetune's augmentation presets; and each fine-tuning step is the trainer's (TrainStep with the
masked multi-label BCE method) on the cosine schedule the torch scheduler gave before."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval.features import Transform, eval_loader, iterate_valid
from eval.finetune import FINETUNE_AUGMENT, augment_config
from eval.sampling import split_patient_ids
from dali_pipes.labelled import FinetuneLoader, build_labelled_index, epoch_order

# Deterministic settings (resize + centre crop, no flip / jitter / blur): a training image then equals its eval view.
NO_AUG = augment_config("moco-cxr", rotation_deg=0.0, hflip_prob=0.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shardgen import make_shards
    return make_shards(tmp_path_factory.mktemp("ft") / "shards", num_patients=40, size_px=40, seed=5,
                       splits={"train": 0.7, "val": 0.15, "test": 0.15})


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    return (torch.cat([b["images"] for b in batches]), torch.cat([b["labels"] for b in batches]),
            torch.cat([b["pids"] for b in batches]).numpy(), [len(b["pids"]) for b in batches])


def test_each_epoch_is_a_fresh_shuffle_of_exactly_the_chosen_patients_with_their_labels(shards):
    all_pids = split_patient_ids(shards, "train")
    chosen = np.unique(all_pids)[::2]
    index = build_labelled_index(shards, "train", chosen)
    assert len(index) == int(np.isin(all_pids, chosen).sum())
    loader = FinetuneLoader(index, batch_size=6, cfg=NO_AUG, image_size=32, channels=1, device="cpu", seed=3)
    img0, lbl0, pid0, sizes = _epoch(loader, 0)
    img1, lbl1, pid1, _ = _epoch(loader, 1)
    # every selected image once per epoch; the last, smaller batch is kept
    assert sizes[:-1] == [6] * (len(sizes) - 1) and sum(sizes) == len(index)
    assert np.array_equal(np.sort(pid0), np.sort(all_pids[np.isin(all_pids, chosen)]))
    # the order differs between epochs (a streamed epoch was previously in stored order, never shuffled)
    assert not np.array_equal(pid0, pid1)
    assert not np.array_equal(pid0, index.pid)
    # and is reproducible for (seed, epoch)
    img0b, _, pid0b, _ = _epoch(loader, 0)
    assert np.array_equal(pid0, pid0b) and torch.equal(img0, img0b)
    # images carry their own labels and pids: match each against the deterministic eval view
    center = Transform(32, 32, view="center")  # the moco-cxr preset's geometry: resize + centre crop
    ev = list(iterate_valid(eval_loader(shards, "train", batch_size=16, device="cpu", transform=center, channels=1)))
    ev_img, ev_lbl, ev_pid = torch.cat([e[0] for e in ev]), torch.cat([e[1] for e in ev]), torch.cat([e[2] for e in ev])
    for i in range(len(pid0)):
        j = int(torch.argmin((ev_img - img0[i]).abs().flatten(1).amax(1)))
        assert torch.allclose(ev_img[j], img0[i], atol=1e-4)
        assert int(ev_pid[j]) == int(pid0[i]) \
            and torch.equal(torch.nan_to_num(ev_lbl[j], 9), torch.nan_to_num(lbl0[i], 9))


def test_augmentation_runs_on_the_dali_graph_and_varies_per_epoch(shards):
    index = build_labelled_index(shards, "train")
    loader = FinetuneLoader(index, batch_size=8, cfg=FINETUNE_AUGMENT, image_size=24, channels=3, device="cpu", seed=0)
    loader.set_epoch(0)
    b = next(iter(loader))
    assert b["images"].shape == (8, 3, 24, 24) and b["images"].is_contiguous(memory_format=torch.channels_last)
    assert b["labels"].shape == (8, 3)
    # same sample order under two seeds' epochs is unlikely; same (seed, epoch) is exact
    assert not np.array_equal(epoch_order(50, 0, 0), epoch_order(50, 0, 1))
    assert np.array_equal(epoch_order(50, 0, 2), epoch_order(50, 0, 2))


def test_augment_presets_and_overrides():
    from dali_pipes import AugmentConfig
    from eval.args import AUGMENT_CHOICES
    assert AUGMENT_CHOICES == ("finetune", *AugmentConfig.PRESETS)
    assert augment_config().crop_scale_min == 0.6 and augment_config(hflip_prob=0.0).hflip_prob == 0.0
    assert augment_config("azizi").rotation_deg == 45.0
    with pytest.raises(ValueError, match="crop scale"):
        augment_config(crop_scale_min=1.5)


def test_a_training_set_too_small_for_a_batchnorm_step_is_noted(shards):
    from eval.features import encoder_spec
    from eval.finetune import FinetuneConfig, finetune
    from eval.labels import LabelPolicy
    from shardgen import LABEL_NAMES
    pids = split_patient_ids(shards, "train")
    ids, counts = np.unique(pids, return_counts=True)
    single = ids[counts == 1][:1]
    spec = encoder_spec(init="random", arch="resnet18", seed=0)
    result, preds, _ = finetune(spec, shards, list(LABEL_NAMES), list(LABEL_NAMES),
                                FinetuneConfig(epochs=1, batch_size=8),
                                policy=LabelPolicy(), transform=Transform(32, 36), train_patients=single,
                                log=lambda m: None)
    assert result["train_images"] == 1 and any("not fine-tuned" in n for n in result["notes"])
    assert preds["scores"].shape[0] == len(split_patient_ids(shards, "test"))


def test_epoch_selection_and_counts_use_only_the_given_validation_patients(shards):
    """Fraction-matched validation: the best epoch is scored on the chosen val patients' images alone, and the
    result counts those images; re-scoring the kept weights on that subset gives the recorded validation AUROC."""
    from eval.features import build_encoder, encoder_spec
    from eval.finetune import FinetuneConfig, finetune
    from eval.labels import LabelPolicy, label_counts, select_targets
    from eval.metrics import evaluate
    from shardgen import LABEL_NAMES
    tasks = list(LABEL_NAMES)
    val_pids = np.unique(split_patient_ids(shards, "val"))
    chosen = val_pids[: max(2, len(val_pids) // 2)]
    spec = encoder_spec(init="random", arch="resnet18", seed=0)
    t = Transform(32, 36)
    result, _, state = finetune(spec, shards, tasks, tasks, FinetuneConfig(epochs=2, batch_size=8), transform=t,
                                val_patients=chosen, policy=LabelPolicy(blank="mask"), log=lambda m: None)
    assert result["label_policy"] == {"blank": "mask", "uncertain": "u-ignore"} and result["eval_view"] == "full"
    index = build_labelled_index(shards, "val", chosen)
    expected = label_counts(select_targets(index.raw_labels(), tasks, tasks, LabelPolicy(blank="mask")), tasks)
    for name in tasks:
        assert (result["tasks"][name]["n_val_pos"], result["tasks"][name]["n_val_neg"]) == \
            (expected[name]["pos"], expected[name]["neg"])
    model, dim = build_encoder(spec)
    head = torch.nn.Linear(dim, len(tasks))
    model.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    model.eval()
    scores, raw, pids = [], [], []
    with torch.no_grad():
        for images, lbl, pid in iterate_valid(eval_loader(shards, "val", batch_size=16, device="cpu", transform=t,
                                                          channels=1)):
            scores.append(torch.sigmoid(head(model(images))).numpy())
            raw.append(lbl.numpy())
            pids.append(pid.numpy())
    scores, raw, pids = np.concatenate(scores), np.concatenate(raw), np.concatenate(pids)
    rows = np.isin(pids, chosen)
    y = select_targets(raw, tasks, tasks, LabelPolicy(blank="mask"))
    subset_auroc = evaluate(y[rows], scores[rows], tasks).mean_auroc
    assert subset_auroc == pytest.approx(result["best_val_mean_auroc"], abs=2e-3)
    # the whole split scores differently, so the check above does tell the two apart (deterministic seeds)
    assert abs(evaluate(y, scores, tasks).mean_auroc - subset_auroc) > 1e-2


def test_cosine_schedule_matches_the_torch_scheduler_it_replaced():
    """Fine-tuning's lr per planned step is `warmup_cosine` without warm-up; it equals CosineAnnealingLR(T_max =
    all planned steps) stepped once per batch (torch computes it recursively: equal to rounding, and exactly once
    rounded to the float32 the SGD update applies it in)."""
    from trainer.schedules import warmup_cosine
    for lr, total in ((0.01, 1), (0.05, 14), (0.3, 700)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        for k in range(total):
            ours = warmup_cosine(k, peak_lr=lr, warmup_steps=0, total_steps=total)
            theirs = opt.param_groups[0]["lr"]
            assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15) and np.float32(ours) == np.float32(theirs)
            opt.step()
            sched.step()


def test_masked_multilabel_step_is_bce_over_labelled_entries_then_sgd():
    """The supervised method through TrainStep: loss = BCE over the non-NaN targets only, one SGD step at the lr
    given, gradients cleared afterwards."""
    from trainer.methods.supervised import Classifier, MaskedMultiLabelBCE
    from trainer.steps import TrainStep
    torch.manual_seed(0)
    net = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), torch.nn.Linear(5, 3))
    ref = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), torch.nn.Linear(5, 3))
    ref.load_state_dict(net.state_dict())
    x = torch.randn(4, 3, 2, 2)
    y = torch.tensor([[1.0, float("nan"), 0.0], [float("nan")] * 3, [0.0, 1.0, float("nan")], [1.0, 1.0, 0.0]])
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    step = TrainStep(net, net, opt, None, precision="fp32", device=torch.device("cpu"),
                     method=MaskedMultiLabelBCE(3))
    loss = step({"images": x, "targets": y}, lr=0.1)
    labelled = ~torch.isnan(y)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(ref(x)[labelled], y[labelled])
    expected.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-6) and not loss.requires_grad
    for p, q in zip(net.parameters(), ref.parameters()):
        assert p.grad is None and torch.allclose(p, q - 0.1 * q.grad, atol=1e-7)
    # the trainer's model config builds the same shape: a ResNet trunk + linear head
    from types import SimpleNamespace
    model = MaskedMultiLabelBCE(4).build_model(SimpleNamespace(arch="resnet18", in_channels=1, init="random"))
    assert isinstance(model, Classifier) and model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


class _BlankSecondBatch:
    """A fine-tune loader whose second batch of every epoch has no label at all (every target masked)."""

    def __init__(self, loader):
        self.loader, self.index = loader, loader.index

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for i, b in enumerate(self.loader):
            yield {**b, "labels": torch.full_like(b["labels"], float("nan"))} if i == 1 else b


def test_finetune_steps_go_through_the_trainers_step_on_the_planned_cosine(shards, monkeypatch):
    """Each optimiser step of `train_one` is a `trainer.steps.TrainStep` call with the supervised method; an
    all-masked batch makes no step but uses up its place in the cosine schedule, which spans every epoch."""
    import eval.finetune as ft
    from eval.features import encoder_spec
    from eval.labels import LabelPolicy
    from shardgen import LABEL_NAMES
    from trainer.schedules import warmup_cosine
    from trainer.steps import TrainStep
    calls = []

    class Recording(TrainStep):
        def __call__(self, batch, lr):
            calls.append((lr, type(self.method).__name__, self.precision, batch["targets"].clone()))
            return super().__call__(batch, lr)

    monkeypatch.setattr(ft, "TrainStep", Recording)
    tasks = list(LABEL_NAMES)
    t = Transform(32, 36)
    index = build_labelled_index(shards, "train", np.unique(split_patient_ids(shards, "train"))[::2])  # fewer steps
    train = _BlankSecondBatch(FinetuneLoader(index, batch_size=8, cfg=NO_AUG, image_size=32, channels=1,
                                             device="cpu", seed=0))
    val = ft.ImageSource(lambda: eval_loader(shards, "val", batch_size=8, device="cpu", transform=t, channels=1),
                         1000)
    cfg = ft.FinetuneConfig(epochs=2, batch_size=8, lr=0.05)
    run = ft.train_one(encoder_spec(init="random", arch="resnet18", seed=0), train, val, tasks, tasks, cfg,
                       policy=LabelPolicy(blank="mask"), device="cpu", log=lambda m: None)
    n = len(index)
    per_epoch = n // 8 + (n % 8 >= 2)
    planned = [warmup_cosine(k, peak_lr=0.05, warmup_steps=0, total_steps=2 * per_epoch)
               for k in range(2 * per_epoch) if k % per_epoch != 1]
    assert per_epoch >= 3 and [c[0] for c in calls] == planned
    assert all(c[1:3] == ("MaskedMultiLabelBCE", "fp32") and not torch.isnan(c[3]).all() for c in calls)
    assert [h["images"] for h in run.history] == [n - 8] * 2
    assert all(math.isfinite(h["train_loss"]) for h in run.history) and run.state is not None
