"""Distribution-shift transfer: the CheXpert / MIMIC / NIH name map and its errors, and `python -m eval transfer`
on real CXRs: probes fitted on a folder-layout source (Normal vs bacterial pneumonia), scored unchanged on an
NIH-layout target without a split (Normal vs viral pneumonia, other images), two encoders compared on the target."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eval.__main__ import main as eval_main
from eval.labels import TaskError
from eval.transfer import map_tasks, parse_task_map
from ingest.schema import CHEXPERT_LABELS, NIH_LABELS

FAST = ["--arch", "resnet18", "--image-size", "64", "--resize-size", "72", "--batch-size", "32", "--device", "cpu",
        "--bootstrap", "200"]


def test_builtin_name_map_and_errors():
    tasks = ["Pleural Effusion", "Cardiomegaly", "Lung Opacity"]
    mapping, notes = map_tasks(tasks, False, list(CHEXPERT_LABELS), list(NIH_LABELS), {}, source="S", target="T")
    assert mapping == {"Pleural Effusion": "Effusion", "Cardiomegaly": "Cardiomegaly"}
    assert notes == ["Lung Opacity: not evaluated: no counterpart among the target's labels"]
    # MIMIC carries CheXpert's names: identity
    assert map_tasks(tasks, True, list(CHEXPERT_LABELS), list(CHEXPERT_LABELS), {}, source="S", target="T")[0] == \
        {t: t for t in tasks}
    # explicit map, in either direction
    m, _ = map_tasks(["Lung Opacity"], True, list(CHEXPERT_LABELS), list(NIH_LABELS),
                     parse_task_map(["Lung Opacity=Infiltration"]), source="S", target="T")
    assert m == {"Lung Opacity": "Infiltration"}
    assert map_tasks(["Effusion"], True, list(NIH_LABELS), list(CHEXPERT_LABELS), {}, source="S", target="T")[0] == \
        {"Effusion": "Pleural Effusion"}
    with pytest.raises(TaskError, match=r"^task 'Lung Opacity' has no counterpart in T .*--task-map"):
        map_tasks(tasks, True, list(CHEXPERT_LABELS), list(NIH_LABELS), {}, source="S", target="T")
    with pytest.raises(TaskError, match=r"'Nope' is not a label of T"):
        map_tasks(tasks, False, list(CHEXPERT_LABELS), list(NIH_LABELS), {"Edema": "Nope"}, source="S", target="T")
    with pytest.raises(TaskError, match=r"'Nope' is not a label of S"):
        map_tasks(tasks, False, list(CHEXPERT_LABELS), list(NIH_LABELS), {"Nope": "Edema"}, source="S", target="T")
    with pytest.raises(TaskError, match=r"^T: no task of S maps to a target label"):
        map_tasks(["Lung Opacity", "Fracture"], False, list(CHEXPERT_LABELS), list(NIH_LABELS), {},
                  source="S", target="T")
    with pytest.raises(TaskError, match="expected SOURCE_NAME=TARGET_NAME"):
        parse_task_map(["Edema"])


def _ingest(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "ingest", "build-shards", *args, "--workers", "0", "--no-progress",
                          "--size", "80"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def _source_shards(shared_data, tmp_path):
    """Folder layout + labels CSV: Normal (first 60 files) = 0, BacterialPneumonia (first 60) = 1, hashed splits."""
    root = shared_data / "pneumonia-mini"
    with open(tmp_path / "src.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "Pneumonia"])
        for cls, label in (("Normal", 0), ("BacterialPneumonia", 1)):
            for p in sorted((root / cls).iterdir(), key=lambda p: p.name)[:60]:
                w.writerow([f"{cls}/{p.name}", label])
    out = tmp_path / "src"
    _ingest(["--source", "folder", "--root", str(root), "--labels-csv", str(tmp_path / "src.csv"), "--out", str(out),
             "--split-mode", "hash", "--val-frac", "0.25", "--test-frac", "0.3", "--dataset-name", "pneumonia"])
    return out


def _nih_target_shards(shared_data, tmp_path, n: int = 30):
    """NIH ChestX-ray14 layout (images/NNNNNNNN_000.png + Data_Entry CSV) holding other real images: Normal files
    60.. as 'No Finding', ViralPneumonia as 'Pneumonia'; no official lists and no hashed split (all in train)."""
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    rows = []
    normal = sorted((shared_data / "pneumonia-mini" / "Normal").iterdir(), key=lambda p: p.name)[60 : 60 + n]
    viral = sorted((shared_data / "pneumonia-mini" / "ViralPneumonia").iterdir(), key=lambda p: p.name)[:n]
    for i, (path, finding) in enumerate([(p, "No Finding") for p in normal] + [(p, "Pneumonia") for p in viral]):
        name = f"{i + 1:08d}_000.png"
        Image.open(path).convert("L").save(root / "images" / name)
        rows.append((name, finding, 0, i + 1, 50, "M" if i % 2 else "F", "PA", 400, 300))
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]"])
        w.writerows(rows)
    out = tmp_path / "nih-shards"
    _ingest(["--source", "nih", "--root", str(root), "--out", str(out), "--val-frac", "0", "--test-frac", "0",
             "--split-mode", "hash"])
    return out


@pytest.fixture(scope="module")
def real_shards(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    return _source_shards(shared_data, tmp), _nih_target_shards(shared_data, tmp), tmp


def _run(capsys, *argv) -> tuple[int, str]:
    rc = eval_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_transfer_real_cxr_folder_to_nih_layout(real_shards, tmp_path, capsys):
    import torch

    from trainer.checkpoint import save_encoder
    from trainer.models import build_backbone
    src, dst, _ = real_shards
    torch.manual_seed(11)
    model, _ = build_backbone("resnet18", 1)
    enc = tmp_path / "ssl-run" / "encoder.pt"
    enc.parent.mkdir()
    save_encoder(enc, model, "resnet18", 1, {"config": {}, "step": 0})
    out = tmp_path / "eval"
    rc, err = _run(capsys, "transfer", "--shards", src, "--target-shards", dst, "--out", out, "--init", "random",
                   "--encoder", enc, *FAST)
    assert rc == 0, err
    res = json.loads((out / "transfer" / "random-resnet18.json").read_text())
    assert res["task_map"] == {"Pneumonia": "Pneumonia"} and res["target_splits"] == ["train"]
    assert res["num_images"]["target"] == 60 and res["label_policy"] == {"blank": "zero", "uncertain": "u-ignore"}
    assert res["eval_view"] in ("full", "center")
    ind, sh = res["in_domain"]["tasks"]["Pneumonia"], res["shifted"]["tasks"]["Pneumonia"]
    drop = res["drop"]["tasks"]["Pneumonia"]
    assert (sh["n_pos"], sh["n_neg"]) == (sh["n_target_pos"], sh["n_target_neg"]) == (30, 30)
    assert ind["n_train_pos"] > 10 and ind["n_val_neg"] > 3 and ind["n_test_pos"] == ind["n_pos"]
    assert ind["auroc"] > 0.7, res  # random-init features separate Normal from bacterial pneumonia in-domain
    for row in (ind, sh):
        assert row["auroc_ci"][0] <= row["auroc"] <= row["auroc_ci"][1]
    assert drop["drop"] == pytest.approx(ind["auroc"] - sh["auroc"])
    assert drop["drop_ci"][0] <= drop["drop"] <= drop["drop_ci"][1]

    # No refitting on the target: scoring the same probes on another target leaves the source predictions unchanged.
    with np.load(out / "transfer" / "random-resnet18-source.npz") as z:
        before = z["scores"].copy()
    rc, err = _run(capsys, "transfer", "--shards", src, "--target-shards", src, "--out", tmp_path / "eval2",
                   "--init", "random", *FAST)
    assert rc == 0, err
    with np.load(tmp_path / "eval2" / "transfer" / "random-resnet18-source.npz") as z:
        assert np.array_equal(z["scores"], before)
    same = json.loads((tmp_path / "eval2" / "transfer" / "random-resnet18.json").read_text())
    assert same["target_splits"] == ["test"]
    assert same["drop"]["tasks"]["Pneumonia"]["drop"] == pytest.approx(0.0, abs=1e-12)

    # encoders pair in command-line order (--encoder files first, then --init baselines)
    paired = json.loads((out / "transfer" / "paired" / "ssl-run-vs-random-resnet18.json").read_text())
    ssl = json.loads((out / "transfer" / "ssl-run.json").read_text())
    assert paired["mean_auroc"]["diff"] == pytest.approx(ssl["shifted"]["mean_auroc"] - res["shifted"]["mean_auroc"])

    # Both datasets on one map, coloured by dataset (features from the cache of the runs above)
    rc, err = _run(capsys, "map", "--shards", src, "--add-shards", dst, "--out", out, "--init", "random", "--color-by",
                   "dataset", *FAST)
    assert rc == 0, err
    with open(out / "map" / "random-resnet18-test-pca-dataset.csv") as f:
        pts = list(csv.DictReader(f))
    datasets = [p["dataset"] for p in pts]
    assert len(pts) == res["num_images"]["test"] + 60 and datasets.count("pneumonia") == res["num_images"]["test"]
    assert len(set(datasets)) == 2 and {p["split"] for p in pts} == {"test", "train"}

    rc, err = _run(capsys, "report", "--out", out)
    assert rc == 0, err
    md = (out / "report.md").read_text()
    assert "## Distribution shift" in md and "| Scratch: random-resnet18 (resnet18), linear probe |" in md
    assert "| SSL: ssl-run (resnet18), linear probe" in md
    assert "label policy: blank = negative, uncertain (-1) u-ignore" in md and "ssl-run − random-resnet18" in md


def test_transfer_of_the_fine_tuned_checkpoint(real_shards, tmp_path, capsys):
    src, dst, _ = real_shards
    out = tmp_path / "eval"
    rc, err = _run(capsys, "transfer", "--shards", src, "--target-shards", dst, "--out", out, "--init", "random",
                   "--finetuned", *FAST)
    assert rc == 2 and "no fine-tuned checkpoint" in err and len(err.strip().splitlines()) == 1, err
    rc, err = _run(capsys, "finetune", "--shards", src, "--out", out, "--init", "random", "--epochs", "1", *FAST)
    assert rc == 0, err
    rc, err = _run(capsys, "transfer", "--shards", src, "--target-shards", dst, "--out", out, "--init", "random",
                   "--finetuned", *FAST)
    assert rc == 0, err
    res = json.loads((out / "transfer" / "random-resnet18-finetuned.json").read_text())
    assert res["probe"] == "finetuned" and res["num_images"]["target"] == 60
    # The checkpoint is scored unchanged: on the source test split it reproduces finetune's own test scores.
    with np.load(out / "finetune" / "random-resnet18.npz") as ft, \
            np.load(out / "transfer" / "random-resnet18-finetuned-source.npz") as tr:
        assert np.array_equal(ft["pids"], tr["pids"])
        np.testing.assert_allclose(tr["scores"], ft["scores"], atol=1e-5)
    assert res["in_domain"]["tasks"]["Pneumonia"]["auroc"] == pytest.approx(
        json.loads((out / "finetune" / "random-resnet18.json").read_text())["tasks"]["Pneumonia"]["auroc"], abs=1e-3)
    assert not (out / "transfer" / "paired").exists()  # a probe and a fine-tuned model are not paired
    rc, err = _run(capsys, "report", "--out", out)
    assert rc == 0, err
    assert "| Scratch: random-resnet18 (resnet18), fine-tuned | Pneumonia |" in (out / "report.md").read_text()


def test_transfer_bad_inputs_one_line(real_shards, capsys):
    src, dst, tmp = real_shards
    from shardgen import make_shards
    other = make_shards(tmp / "synthetic", num_patients=8, size_px=40)  # Cardiomegaly / Edema / Pleural Effusion only
    common = ["--out", tmp / "bad", "--init", "random", *FAST]
    for argv, expect in (
        (["--shards", src, "--target-shards", other], "no task of"),
        (["--shards", src, "--target-shards", dst, "--task-map", "Pneumonia=Nope"], "'Nope' is not a label of"),
        (["--shards", src, "--target-shards", dst, "--task-map", "Pneumonia"], "expected SOURCE_NAME=TARGET_NAME"),
        (["--shards", src, "--target-shards", tmp / "missing"], "does not exist"),
    ):
        rc, err = _run(capsys, "transfer", *argv, *common)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
