"""`python -m eval` end to end on CPU: every subcommand on small synthetic shards, bad-input errors, the feature
cache, and a real run: a linear probe on random-init ResNet-18 features of real CXRs (Normal vs pneumonia)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from eval.__main__ import main as eval_main
from eval.features import Transform, encoder_spec, extract_features, feature_cache_key
from eval.sampling import split_patient_ids
from dali_pipes.labelled import build_labelled_index

FAST = ["--arch", "resnet18", "--image-size", "32", "--resize-size", "36", "--batch-size", "16", "--bootstrap", "200"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shardgen import make_shards
    return make_shards(tmp_path_factory.mktemp("eval") / "shards", num_patients=36, size_px=48, seed=3)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    import torch

    from trainer.checkpoint import save_encoder
    from trainer.models import build_backbone
    torch.manual_seed(7)
    model, _ = build_backbone("resnet18", 1)
    path = tmp_path_factory.mktemp("run") / "ssl-run" / "encoder.pt"
    path.parent.mkdir()
    save_encoder(path, model, "resnet18", 1, {"config": {}, "step": 0})
    return path


def _run(capsys, *argv) -> tuple[int, str]:
    rc = eval_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_every_subcommand_end_to_end(shards, encoder_file, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["--shards", shards, "--out", out, *FAST]
    rc, err = _run(capsys, "linear", *common, "--init", "random", "--encoder", encoder_file.parent)
    assert rc == 0, err
    lin = json.loads((out / "linear" / "ssl-run.json").read_text())
    assert lin["encoder"]["category"] == "SSL" and lin["encoder"]["arch"] == "resnet18"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert lin["num_images"]["test"] == sum(s["num_samples"] for s in manifest["splits"]["test"]["shards"])
    evaluated = [t for t, r in lin["tasks"].items() if not r["note"]]
    assert evaluated, lin["notes"]
    for t in evaluated:
        r = lin["tasks"][t]
        assert 0 <= r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1] <= 1 and 0 <= r["auprc"] <= 1
    with np.load(out / "linear" / "random-resnet18.npz") as z:
        assert z["scores"].shape == z["targets"].shape == (lin["num_images"]["test"], 3)
    # the label policy and view are recorded; per-task counts equal the raw shard labels counted directly
    assert lin["label_policy"] == {"blank": "zero", "uncertain": "u-ignore"} and lin["eval_view"] == "full"
    assert lin["transform"] == {"eval_view": "full", "image_size": 32}
    raw = {s: build_labelled_index(shards, s).raw_labels() for s in ("train", "val", "test")}
    for j, t in enumerate(["Cardiomegaly", "Edema", "Pleural Effusion"]):
        for split, r in raw.items():
            assert lin["tasks"][t][f"n_{split}_pos"] == int(np.sum(r[:, j] == 1))
            assert lin["tasks"][t][f"n_{split}_neg"] == int(np.sum((r[:, j] == 0) | np.isnan(r[:, j])))
    assert any(np.isnan(r).any() for r in raw.values())  # the fixture has blanks, so the two policies differ

    # --blank mask --eval-view center: blanks leave the counts, and the view makes its own cache entries
    rc, err = _run(capsys, "linear", "--shards", shards, "--out", tmp_path / "masked", *FAST, "--init", "random",
                   "--blank", "mask", "--eval-view", "center")
    assert rc == 0, err
    masked = json.loads((tmp_path / "masked" / "linear" / "random-resnet18.json").read_text())
    assert masked["label_policy"] == {"blank": "mask", "uncertain": "u-ignore"} and masked["eval_view"] == "center"
    edema_neg = masked["tasks"]["Edema"]["n_train_neg"]
    assert edema_neg == int(np.sum(raw["train"][:, 1] == 0)) < lin["tasks"]["Edema"]["n_train_neg"]
    center_keys = {p.name for p in (tmp_path / "masked" / "cache").glob("*.npz")}
    assert len(center_keys) == 3 and not center_keys & {p.name for p in (out / "cache").glob("*.npz")}

    cache_files = sorted((out / "cache").glob("*.npz"))
    assert len(cache_files) == 6  # 2 encoders x 3 splits
    mtimes = [p.stat().st_mtime_ns for p in cache_files]

    # Finished output is not overwritten without --overwrite; with it, features come from the cache.
    rc, err = _run(capsys, "linear", *common, "--init", "random")
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    rc, err = _run(capsys, "linear", *common, "--init", "random", "--overwrite")
    assert rc == 0, err
    assert [p.stat().st_mtime_ns for p in cache_files] == mtimes

    rc, err = _run(capsys, "fewshot", *common, "--init", "random", "--k", "2", "--seeds", "20",
                   "--probe-backend", "torch")
    assert rc == 0, err
    few = json.loads((out / "fewshot" / "random-resnet18-k2.json").read_text())
    assert few["num_seeds"] == 20 and all(len(v) == 20 for v in few["per_seed_auroc"].values())
    assert few["C"] == 1.0 and few["C_tuned"] is False and few["label_policy"]["blank"] == "zero"
    for t, row in few["tasks"].items():  # scored on every labelled test image, not a balanced subset
        assert (row["n_test_pos"], row["n_test_neg"]) == (lin["tasks"][t]["n_test_pos"], lin["tasks"][t]["n_test_neg"])
        lo, hi = row["auroc_ci95"]
        assert lo <= row["auroc"] <= hi and 0 <= row["balanced_accuracy"] <= 1
    assert few["mean_balanced_accuracy"]["balanced_accuracy_std"] >= 0

    rc, err = _run(capsys, "fractions", *common, "--init", "random", "--fractions", "0.25,1", "--seeds", "2")
    assert rc == 0, err
    frac = json.loads((out / "fractions" / "random-resnet18-linear.json").read_text())
    assert [c["fraction"] for c in frac["curve"]] == [0.25, 1.0]
    assert frac["curve"][1]["mean_auroc"] == pytest.approx(lin_random_mean(out), abs=1e-9)  # 100% = the linear probe
    assert frac["val_policy"]["policy"] == "matched" and frac["val_policy"]["min_per_class"] == 5
    num_val = lin["num_images"]["val"]
    assert [v["num_images"] for v in frac["curve"][1]["val_selection"]] == [num_val, num_val]  # 100%: all of val
    assert all(v["num_images"] <= num_val for v in frac["curve"][0]["val_selection"])
    assert frac["curve"][0]["label_counts"][0]["Edema"]["n_train_pos"] <= lin["tasks"]["Edema"]["n_train_pos"]

    # End-to-end half of the curve; a 4-image budget streams the validation split instead of keeping it decoded.
    rc, err = _run(capsys, "fractions", *common, "--init", "random", "--fractions", "0.5,1", "--seeds", "1",
                   "--mode", "finetune",
                   "--epochs", "1", "--max-images-in-memory", "4")
    assert rc == 0, err
    ftc = json.loads((out / "fractions" / "random-resnet18-finetune.json").read_text())
    half, full = ftc["curve"]
    train_pids = split_patient_ids(shards, "train")
    from eval.sampling import fraction_subsets
    assert half["num_images"] == [len(fraction_subsets(train_pids, (0.5, 1.0), 0)[0.5])]
    assert half["num_images"][0] < full["num_images"][0] == lin["num_images"]["train"]

    rc, err = _run(capsys, "finetune", *common, "--encoder", encoder_file, "--epochs", "1", "--grid", "0.01,0.05:0")
    assert rc == 0, err
    ft = json.loads((out / "finetune" / "ssl-run.json").read_text())
    assert len(ft["grid"]) == 2 and ft["chosen_lr"] in (0.01, 0.05) and ft["val_in_memory"]
    assert ft["train_images"] == lin["num_images"]["train"] and ft["config"]["augment"]["name"] == "finetune"
    assert ft["label_policy"] == lin["label_policy"] and ft["eval_view"] == "full"
    for t in ("Cardiomegaly", "Edema"):  # the training loader counts its labels under the same policy
        assert {k: v for k, v in ft["tasks"][t].items() if k.startswith("n_")} == \
            {k: v for k, v in lin["tasks"][t].items() if k.startswith("n_")}
    import torch
    best = torch.load(out / "finetune" / "ssl-run.pt", weights_only=True)
    assert best["lr"] == ft["chosen_lr"] and best["epoch"] == ft["best_epoch"] \
        and best["head"]["weight"].shape == (3, 512)
    chosen = max(ft["grid"], key=lambda g: g["best_val_mean_auroc"])
    assert ft["best_val_mean_auroc"] == chosen["best_val_mean_auroc"] \
        == max(h["val_mean_auroc"] for h in chosen["history"])

    rc, err = _run(capsys, "compare", "--out", out, "--a", "ssl-run", "--b", "random-resnet18", "--bootstrap", "200")
    assert rc == 0, err
    cmp = json.loads((out / "compare" / "ssl-run-vs-random-resnet18-linear.json").read_text())
    assert cmp["mean_auroc"]["diff"] == pytest.approx(lin["mean_auroc"] - lin_random_mean(out))

    rc, err = _run(capsys, "report", "--out", out)
    assert rc == 0, err
    md = (out / "report.md").read_text()
    assert "C is fixed, not tuned" in md and "| Scratch: random-resnet18 (resnet18) | 2 | 20 | 1 |" in md
    assert "| Scratch: random-resnet18" in md and "| SSL: ssl-run" in md and "Paired comparisons" in md
    setting = ("_Setting: label policy: blank = negative, uncertain (-1) u-ignore; "
               "eval view: full (whole film resized to 32 x 32 px)._")
    assert md.count(setting) == 4  # under the linear, fine-tune, k-shot and fraction tables
    assert "_Model selection: validation patients subsampled to the training fraction" in md
    for png in ("fractions.png", "roc-linear.png", "roc-finetune.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((out / "report.json").read_text())) \
        >= {"linear", "finetune", "fewshot", "fractions", "compare"}


def lin_random_mean(out) -> float:
    return json.loads((out / "linear" / "random-resnet18.json").read_text())["mean_auroc"]


def test_bad_inputs_one_line_errors(shards, encoder_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    common = ["--shards", shards, "--out", out, *FAST]
    cases = [
        (["linear", *common, "--init", "random", "--tasks", "Cardiomegaly,Pneumonitis"], "unknown task 'Pneumonitis'"),
        (["linear", *common, "--init", "random", "--tasks", "chexpert5"], "no labels for task 'Atelectasis'"),
        (["linear", "--shards", shards, "--out", out, "--encoder", encoder_file, "--arch", "resnet50"],
         "encoder is resnet18"),
        (["linear", "--shards", shards, "--out", out, "--encoder", encoder_file, "--in-channels", "3"],
         "1 input channel"),
        (["linear", "--shards", tmp_path / "nowhere", "--out", out, "--init", "random"], "does not exist"),
        (["compare", "--out", out, "--a", "x", "--b", "y"], "no stored predictions for 'x'"),
    ]
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    cases.append((["linear", "--shards", shards, "--out", out, "--encoder", bogus], "bogus.pt"))
    # an encoder.pt whose weights do not fit the model it declares: caught before the first encoder is evaluated
    import torch
    doc = torch.load(encoder_file, weights_only=True)
    wrong = tmp_path / "wrong" / "encoder.pt"
    wrong.parent.mkdir()
    torch.save({**doc, "arch": "resnet34"}, wrong)
    cases.append((["linear", "--shards", shards, "--out", out, "--encoder", encoder_file, "--encoder", wrong],
                  "weights do not match resnet34"))
    # shards ingested without labels
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(shards, unlabelled)
    manifest = json.loads((unlabelled / "manifest.json").read_text())
    manifest["label_names"] = []
    (unlabelled / "manifest.json").write_text(json.dumps(manifest))
    cases.append((["linear", "--shards", unlabelled, "--out", out, "--init", "random"], "shards carry no labels"))
    # argument errors are one line too (no usage block)
    cases += [
        (["fractions", *common, "--init", "random", "--fractions", "0,0.5"], "label fractions must lie in (0, 1]"),
        (["finetune", *common, "--init", "random", "--lr", "-0.1"], "--lr: expected a positive number"),
        (["finetune", *common, "--init", "random", "--grid", "0.1:-1"], "--grid '0.1:-1'"),
        (["linear", *common, "--init", "random", "--c-grid", "0,1"], "--c-grid"),
        (["linear", *common, "--init", "random", "--uncertainty", "u-maybe"], "--uncertainty"),
        (["linear", *common, "--init", "random", "--blank", "maybe"], "--blank: invalid choice: 'maybe'"),
        (["finetune", *common, "--init", "random", "--eval-view", "letterbox"],
         "--eval-view: invalid choice: 'letterbox'"),
        (["fractions", *common, "--init", "random", "--val-policy", "half"], "--val-policy: invalid choice: 'half'"),
        (["fewshot", *common, "--init", "random", "--seeds", "5"], "--seeds: expected an integer >= 20"),
    ]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no cached ImageNet weights
    cases.append((["linear", *common, "--init", "imagenet"], "local torch hub cache"))
    for argv, expected in cases:
        rc, err = _run(capsys, *argv)
        assert rc == 2, (argv, err)
        assert expected in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (out / "linear").exists()


def test_features_drop_padding_and_cache_key(shards, tmp_path):
    spec = encoder_spec(init="random", arch="resnet18", seed=1)
    t = Transform(32, 36)
    a = extract_features(spec, shards, "val", transform=t, batch_size=5, cache_dir=tmp_path, log=lambda m: None)
    b = extract_features(spec, shards, "val", transform=t, batch_size=64, cache_dir=None)
    assert len(a) == len(b) == json.loads((shards / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    assert np.array_equal(a.pids, b.pids) and np.allclose(a.features, b.features, atol=1e-4)
    assert np.array_equal(np.isnan(a.labels), np.isnan(b.labels))
    key = feature_cache_key(spec, shards, "val", t)
    assert key != feature_cache_key(spec, shards, "val", Transform(64, 72))
    assert key != feature_cache_key(encoder_spec(init="random", arch="resnet18", seed=2), shards, "val", t)
    assert key != feature_cache_key(spec, shards, "test", t)
    assert key != feature_cache_key(spec, shards, "val", t, "gpu")
    assert np.array_equal(np.sort(split_patient_ids(shards, "val")), np.sort(a.pids))


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "eval", "linear", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--uncertainty" in res.stdout and "--bootstrap" in res.stdout
    assert "--blank" in res.stdout and "--eval-view" in res.stdout
    # argument parsing stays light: no torch / DALI until a protocol runs
    res = subprocess.run([sys.executable, "-c", "import sys, eval.cli; print(sorted(m for m in ('torch', 'dali_pipes', "
                          "'nvidia.dali') if m in sys.modules))"], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def _pneumonia_shards(shared_data, tmp_path, per_class: int):
    """Build labelled shards from real images through `ingest build-shards --source folder` with a labels CSV:
    Pneumonia = 1 for the bacterial / viral folders, 0 for Normal; one patient per image (the source has no ids)."""
    root = shared_data / "pneumonia-mini"
    rows = []
    for cls, count, label in (("Normal", 2 * per_class, 0), ("BacterialPneumonia", per_class, 1),
                              ("ViralPneumonia", per_class, 1)):
        files = sorted((root / cls).iterdir(), key=lambda p: p.name)[:count]
        rows += [(f"{cls}/{p.name}", label) for p in files]
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "Pneumonia"])
        w.writerows(rows)
    out = tmp_path / "shards"
    res = subprocess.run([sys.executable, "-m", "ingest", "build-shards", "--source", "folder", "--root", str(root),
                          "--labels-csv", str(csv_path), "--out", str(out), "--size", "80", "--split-mode", "hash",
                          "--val-frac", "0.25", "--test-frac", "0.3", "--workers", "0", "--no-progress",
                          "--dataset-name", "pneumonia"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_real_cxr_linear_probe_on_random_features_carries_signal(shared_data, tmp_path, capsys):
    shards = _pneumonia_shards(shared_data, tmp_path, per_class=60)  # 240 real images
    out = tmp_path / "eval"
    rc, err = _run(capsys, "linear", "--shards", shards, "--out", out, "--init", "random", "--arch", "resnet18",
                   "--image-size", "64", "--resize-size", "72", "--batch-size", "32", "--device", "cpu",
                   "--bootstrap", "500")
    assert rc == 0, err
    res = json.loads((out / "linear" / "random-resnet18.json").read_text())
    task = res["tasks"]["Pneumonia"]
    assert task["n_pos"] > 20 and task["n_neg"] > 20
    assert res["mean_auroc"] > 0.7 and res["mean_auroc_ci"][0] > 0.5, res


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_features_match_cpu(shards):
    spec = encoder_spec(init="random", arch="resnet18", seed=0)
    t = Transform(32, 36)
    cpu = extract_features(spec, shards, "test", device="cpu", transform=t, batch_size=8)
    gpu = extract_features(spec, shards, "test", device="gpu", transform=t, batch_size=8)
    assert np.array_equal(cpu.pids, gpu.pids)
    # GPU decode (nvJPEG) and bf16 autocast differ slightly from the CPU path; features must still agree closely.
    norms = np.linalg.norm(cpu.features, axis=1) * np.linalg.norm(gpu.features, axis=1)
    cos = np.sum(cpu.features * gpu.features, 1) / norms
    assert cos.min() > 0.98


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_linear_and_finetune_cli(shards, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["--shards", shards, "--out", out, "--init", "random", "--device", "gpu", *FAST]
    rc, err = _run(capsys, "linear", *common)  # --probe-backend auto -> torch L-BFGS on the GPU
    assert rc == 0, err
    # training batches decoded + augmented on the GPU by DALI; validation streamed, then kept in memory
    for budget in ("4", "20000"):
        rc, err = _run(capsys, "finetune", *common, "--epochs", "1", "--max-images-in-memory", budget, "--overwrite")
        assert rc == 0, err
    assert json.loads((out / "finetune" / "random-resnet18.json").read_text())["val_in_memory"]


def test_imagenet_encoder_from_offline_cache(shards, tmp_path, capsys, monkeypatch):
    """--init imagenet reads the torch hub cache only (here a stand-in weights file) and re-normalises inputs."""
    import torch
    import torchvision

    import dali_pipes
    from eval.imagenet_input import IMAGENET_MEAN, IMAGENET_STD, ImageNetInput
    from trainer.encoder_io import imagenet_weights_path
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    out = tmp_path / "eval"
    rc, err = _run(capsys, "linear", "--shards", shards, "--out", out, "--init", "imagenet", *FAST)
    assert rc == 0, err
    res = json.loads((out / "linear" / "imagenet-resnet18.json").read_text())
    assert res["encoder"]["category"] == "ImageNet" and res["encoder"]["in_channels"] == 3
    # the fine-tuned ImageNet backbone is saved as a plain torchvision state dict (no input-adapter prefix)
    rc, err = _run(capsys, "finetune", "--shards", shards, "--out", out, "--init", "imagenet", *FAST, "--epochs", "1")
    assert rc == 0, err
    saved = torch.load(out / "finetune" / "imagenet-resnet18.pt", weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(saved["backbone"], strict=False)
    assert not unexpected and sorted(missing) == ["fc.bias", "fc.weight"]
    raw = torch.rand(2, 3, 4, 4)
    x_cxr = (raw - dali_pipes.CXR_MEAN) / dali_pipes.CXR_STD
    expected = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(ImageNetInput(3)(x_cxr), expected, atol=1e-5)


def test_report_table_rows_scratch_imagenet_ssl_with_cis_and_fraction_plot_styles(tmp_path):
    """report.md orders encoders like the published tables (Scratch, ImageNet, SSL) with CIs in every cell; the
    label-fraction plot keeps one colour per encoder, solid for linear and dashed for fine-tuned."""
    from eval.report import plot_fractions, write_report
    out = tmp_path / "eval"
    docs = []
    for name, cat in (("ssl-run", "SSL"), ("imagenet-resnet18", "ImageNet"), ("random-resnet18", "Scratch")):
        enc = {"name": name, "category": cat, "arch": "resnet18"}
        lin = {"encoder": enc, "task_names": ["Edema"], "mean_auroc": 0.7, "mean_auroc_ci": [0.6, 0.8], "notes": [],
               "tasks": {"Edema": {"auroc": 0.7, "auroc_ci": [0.6, 0.8]}}}
        (out / "linear").mkdir(parents=True, exist_ok=True)
        (out / "linear" / f"{name}.json").write_text(json.dumps(lin))
        for mode in ("linear", "finetune"):
            doc = {"encoder": enc, "mode": mode,
                   "curve": [{"fraction": f, "mean_auroc": 0.6 + f / 10, "mean_auroc_ci": [0.5, 0.8]}
                             for f in (0.01, 1.0)]}
            (out / "fractions").mkdir(exist_ok=True)
            (out / "fractions" / f"{name}-{mode}.json").write_text(json.dumps(doc))
            docs.append(doc)
    write_report(out)
    rows = [line for line in (out / "report.md").read_text().splitlines()
            if line.startswith("| ") and "resnet18" in line]
    assert [r.split(":")[0] for r in rows[:3]] == ["| Scratch", "| ImageNet", "| SSL"]
    assert all("0.700 [0.600, 0.800]" in r for r in rows[:3])
    assert (out / "fractions.png").read_bytes()[:4] == b"\x89PNG"
    drawn = plot_fractions(docs, tmp_path / "f.png")
    colour = {}
    for label, c, style in drawn:
        enc = label.split(",")[0]
        assert colour.setdefault(enc, c) == c and style == ("--" if label.endswith("fine-tuned") else "-")
    assert len(set(colour.values())) == 3


def test_compare_refuses_results_under_different_label_policies_or_views(tmp_path, capsys):
    folder = tmp_path / "eval" / "linear"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    targets, pids = rng.integers(0, 2, (40, 1)).astype(np.float32), np.arange(40)
    for name, blank, view in (("a", "zero", "full"), ("b", "mask", "full"), ("c", "zero", "full")):
        np.savez(folder / f"{name}.npz", targets=targets, scores=rng.random((40, 1)), pids=pids, tasks=np.array(["T"]))
        (folder / f"{name}.json").write_text(json.dumps({"label_policy": {"blank": blank, "uncertain": "u-ignore"},
                                                         "eval_view": view}))
    rc, err = _run(capsys, "compare", "--out", tmp_path / "eval", "--a", "a", "--b", "b", "--bootstrap", "50")
    assert rc == 2 and "different settings" in err and len(err.strip().splitlines()) == 1, err
    rc, err = _run(capsys, "compare", "--out", tmp_path / "eval", "--a", "a", "--b", "c", "--bootstrap", "50")
    assert rc == 0, err
