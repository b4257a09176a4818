"""`scripts/demo_report.py`: the demo's verdict passes only when the paired-bootstrap CI of the difference is
above 0."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("demo_report", REPO / "scripts" / "demo_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _eval_folder(demo: Path, diff: float, ci: tuple[float, float]) -> None:
    tasks = ["Cardiomegaly", "Edema"]
    for name, auroc in (("run", 0.8 + diff), ("random-resnet18", 0.8)):
        doc = {"mean_auroc": auroc, "mean_auroc_ci": [auroc - 0.02, auroc + 0.02],
               "tasks": {t: {"auroc": auroc, "auroc_ci": [auroc - 0.03, auroc + 0.03]} for t in tasks}}
        (demo / "eval" / "linear").mkdir(parents=True, exist_ok=True)
        (demo / "eval" / "linear" / f"{name}.json").write_text(json.dumps(doc))
    cmp_ = {"task_names": tasks, "tasks": {t: {"diff": diff, "ci": list(ci)} for t in tasks},
            "mean_auroc": {"diff": diff, "ci": list(ci), "p_value": 0.01}}
    (demo / "eval" / "compare").mkdir(parents=True)
    (demo / "eval" / "compare" / "run-vs-random-resnet18-linear.json").write_text(json.dumps(cmp_))
    (demo / "run").mkdir()
    rows = [{"step": s, "loss": 5 - s / 10, "lr": 0.001, "health/emb_std": 0.05 + s / 100, "health/top1": s / 10,
             "health/align": 1.0, "health/uniform": -2.0, "health/grad_norm": 3.0} for s in range(1, 6)]
    for r in rows[1::2]:
        r.update({"knn_auroc_mean": 0.5 + r["step"] / 50, "knn_auroc/Edema": 0.6, "knn_auroc/Cardiomegaly": 0.55})
    (demo / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (demo / "run" / "config.toml").write_text("[model]\nproj_dim = 128\n")


@pytest.mark.parametrize("diff, ci, rc", [(0.04, (0.01, 0.07), 0), (0.01, (-0.01, 0.03), 1),
                                          (-0.02, (-0.04, -0.01), 1)])
def test_verdict_needs_the_ci_above_zero(tmp_path, capsys, diff, ci, rc):
    _eval_folder(tmp_path, diff, ci)
    assert _load().main([str(tmp_path), "run", "random-resnet18"]) == rc
    out = capsys.readouterr().out
    assert ("PASS" if rc == 0 else "FAIL") in out and "| **mean** |" in out
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "![phantoms](phantoms.png)" in readme and "![views](views.png)" in readme
    assert (tmp_path / "report" / "pretrain_loss.png").is_file()
    assert "![kNN AUROC](knn_auroc.png)" in readme and "mean kNN AUROC 0.580 at step 4" in readme
    assert "![health](health.png)" in readme
    assert (tmp_path / "report" / "knn_auroc.png").is_file() and (tmp_path / "report" / "health.png").is_file()


def test_missing_results_are_a_one_line_error(tmp_path, capsys):
    assert _load().main([str(tmp_path), "run", "random-resnet18"]) == 2
    assert "cannot read the eval results" in capsys.readouterr().err


def test_a_dino_run_is_reported_as_dino_with_its_collapse_signals(tmp_path, capsys):
    _eval_folder(tmp_path, 0.04, (0.01, 0.07))
    (tmp_path / "run" / "config.toml").write_text('[loss]\nmethod = "dino"\ndino_out_dim = 1024\n')
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 6, "loss": 6.9, "lr": 0.001, "health/emb_std": 0.07, "health/grad_norm": 1.0,
                            "health/teacher_entropy": 6.4, "health/proto_perplexity": 900.0,
                            "health/student_teacher_kl": 0.4}) + "\n")
    assert _load().main([str(tmp_path), "run", "random-resnet18"]) == 0
    out = capsys.readouterr().out
    assert "PASS: the DINO encoder beats random init" in out and "SimCLR" not in out
    readme = (tmp_path / "report" / "README.md").read_text()
    assert readme.startswith("# Demo: DINO on procedural") and "teacher targets' mean entropy" in readme
    assert "SSL (DINO) AUROC" in readme and "SimCLR" not in readme
