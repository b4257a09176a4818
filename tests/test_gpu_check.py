"""scripts/gpu_check.py under a simulated lent GPU machine (no DALI, webdataset, pydicom or FastAPI; torch 2.11,
Triton 3.6, torchvision 0.26): the dry runs, the caps, the parts of stage B, results kept as they are measured, JUnit
written per test, `python -m bench render`, and a CPU smoke run of the loss step."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.gpu_results import append_record, read_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up while the file executes
_spec.loader.exec_module(gpu_check)

# The lent machine's Python: these imports fail there, its torch / Triton / torchvision are older than this venv's.
LENT_SITECUSTOMIZE = textwrap.dedent('''
    import atexit, importlib.metadata, os, sys
    BLOCKED = ("nvidia.dali", "webdataset", "pydicom", "fastapi")
    LENT = {"torch": "2.11.0+cu130", "triton": "3.6.0", "torchvision": "0.26.0+cu130"}

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {name!r} (simulated lent machine)", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())
    _version = importlib.metadata.version
    importlib.metadata.version = lambda dist: LENT.get(dist.lower(), None) or _version(dist)
    # appended: the driver and each step's child process add theirs
    atexit.register(lambda: open(os.environ["LOADED_MODULES"], "a").write("\\n".join(sorted(sys.modules)) + "\\n"))
''')


def _lent_run(tmp_path: Path, *args: str, timeout_s: int = 120) -> tuple[subprocess.CompletedProcess, set[str]]:
    site = tmp_path / "lent-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(LENT_SITECUSTOMIZE)
    loaded = tmp_path / "loaded.txt"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "LOADED_MODULES": str(loaded), "HOME": str(tmp_path),
           "GPU_CHECK_WORK": str(tmp_path / "work")}
    run = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    return run, set(loaded.read_text().split()) if loaded.is_file() else set()


def test_simulated_lent_machine_blocks_what_it_lacks(tmp_path):
    site = tmp_path / "lent-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LENT_SITECUSTOMIZE)
    code = ("import importlib.metadata as m\nfor n in ('webdataset', 'pydicom', 'fastapi', 'nvidia.dali'):\n"
            "    try:\n        __import__(n)\n        print('IMPORTED', n)\n    except ImportError:\n        pass\n"
            "print(m.version('torch'), m.version('triton'))")
    run = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(site), "LOADED_MODULES": "/dev/null"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "IMPORTED" not in run.stdout and "2.11.0+cu130 3.6.0" in run.stdout


def test_stage_a_dry_run_on_the_lent_machine(tmp_path):
    run, loaded = _lent_run(tmp_path, "--stage", "A", "--dry-run", "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for step in ("env", "loss", "model", "dino", "tests"):
        assert re.search(rf"^  {step}\s+<=\s+\d+ s", out, re.M), step
    assert "4,096 / 16,384 / 65,536 views" in out and "ResNet-50" in out and "gpu and not dali" in out
    assert "ViT-S/16" in out and "2x224 + 8x96 px, batch 64" in out
    # the rows each timed step measures, compiled last: a compile cut at the cap takes no eager row with it
    rows = dict(re.findall(r"^  (\w+)\s+<=.*\n\s+rows in order \(a cap cuts the last first\): (.*)$", out, re.M))
    assert rows["dino"].split("; ") == ["DINO vit_small_patch16 step images/s, eager",
                                        "DINO vit_small_patch16 step images/s, compile",
                                        "DINO vit_small_patch16 step speedup, compiled / eager"]
    assert rows["model"].split("; ")[0] == "resnet50 train step images/s, eager"
    assert rows["model"].split("; ")[-1] == "resnet50 train step images/s, compile"
    for name in ("results.jsonl", "env.json", "junit.xml", "summary.md", "logs.tar.gz"):
        assert name in out
    assert re.search(r"^  torch\s+2\.11\.0\+cu130\s+floor 2\.11\s+ok", out, re.M), out
    assert re.search(r"^  torchvision\s+0\.26\.0\+cu130\s+floor 0\.26\s+ok", out, re.M), out
    assert re.search(r"^  timm\s+\S+\s+floor 1\.0\s+ok", out, re.M), out  # the dino step's ViT
    assert "NOT OK" not in out
    # planning imports neither torch nor anything the lent machine lacks, and needs no GPU
    assert not loaded & {"torch", "triton", "webdataset", "pydicom", "fastapi", "nvidia.dali"}, loaded
    assert not (tmp_path / "out").exists()


def test_stage_b_dry_run_names_its_parts(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i, size in enumerate((3000, 2000, 500), 1):
        (wheels / f"cxr-wheels.part-{i:02d}").write_bytes(b"x" * size)
        parts.append({"name": f"cxr-wheels.part-{i:02d}", "bytes": size, "sha256": f"{i:064x}"})
    (wheels / "cxr-wheels.part-03").unlink()  # carried in the last call: not here yet
    install = "python3 -m pip install -q --no-index --no-deps --target /tmp/cxr-site /tmp/cxr-wheels/*.whl"
    (wheels / "manifest.json").write_text(json.dumps({"parts": parts, "install": install}))
    run, _ = _lent_run(tmp_path, "--stage", "B", "--dry-run", "--wheels", str(wheels))
    assert run.returncode == 0, run.stderr
    for p in parts:
        assert p["name"] in run.stdout
    assert "cxr-wheels.part-03" in run.stdout and "[not here]" in run.stdout
    assert f"install: {install}" in run.stdout
    assert re.search(r"^  nvidia\.dali\s+missing", run.stdout, re.M)
    for step in ("install", "shards", "dali", "e2e", "tests"):
        assert re.search(rf"^  {step}\s+<=\s+\d+ s", run.stdout, re.M), step
    missing, _ = _lent_run(tmp_path, "--stage", "B", "--dry-run", "--wheels", str(tmp_path / "none"))
    assert missing.returncode == 0 and "scripts/gpu_wheels.sh" in missing.stdout


def test_caps_fit_the_lent_minutes():
    deadline_a, steps_a = gpu_check.STAGES["A"]
    deadline_b, steps_b = gpu_check.STAGES["B"]
    caps_a, caps_b = sum(s.cap_s for s in steps_a), sum(s.cap_s for s in steps_b)
    assert caps_a <= deadline_a <= 300 and caps_b <= deadline_b <= 240
    assert [s.name for s in steps_a] == ["env", "loss", "model", "dino", "tests"]
    assert set(gpu_check.STEP_BODIES) | {"install", "tests"} == {s.name for s in steps_a + steps_b}
    assert caps_a + caps_b <= 540
    assert len(gpu_check.OUT_FILES) <= 8


def test_test_lists_cover_every_gpu_test_file():
    """Stage A runs the gpu tests without the dali mark, stage B those with it: every file with either is listed."""
    gpu_files, dali_files = set(), set()
    for path in (ROOT / "tests").glob("test_*.py"):
        text = path.read_text()
        if re.search(r"^@pytest\.mark\.gpu$", text, re.M):
            gpu_files.add(f"tests/{path.name}")
        if re.search(r"^@pytest\.mark\.dali$", text, re.M):
            dali_files.add(f"tests/{path.name}")
    assert dali_files <= set(gpu_check.TEST_FILES["B"])
    assert gpu_files - {"tests/test_eval_cli.py", "tests/test_dali_augment.py", "tests/test_dali_handoff.py",
                        "tests/test_dali_pipes.py"} <= set(gpu_check.TEST_FILES["A"])
    assert set(gpu_check.TEST_FILES["A"]) | set(gpu_check.TEST_FILES["B"]) <= gpu_files


def test_a_step_cut_at_its_cap_keeps_what_it_recorded(tmp_path):
    child = ("import sys, time; sys.path.insert(0, sys.argv[1])\nfrom bench.gpu_results import append_record\n"
             "append_record(__import__('pathlib').Path(sys.argv[2]), {'kind': 'figure', 'metric': 'm', 'value': 1})\n"
             "time.sleep(60)")
    log = tmp_path / "step.log"
    status, detail = gpu_check._run_child([sys.executable, "-c", child, str(ROOT), str(tmp_path / "r.jsonl")], {},
                                          log, timeout_s=8)
    assert status == "timeout" and "cap" in detail
    records, bad = read_records(tmp_path / "r.jsonl")
    assert bad == 0 and [r["metric"] for r in records] == ["m"]


def test_junit_and_results_are_written_test_by_test(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent('''
        import pytest
        def test_ok():
            assert True
        def test_bad():
            assert 1 == 2
        @pytest.mark.skip(reason="not here")
        def test_skip():
            pass
    '''))
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'scripts'}:{ROOT}", "GPU_CHECK_OUT": str(out),
           "GPU_CHECK_STAGE": "A"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check",
                          "test_sample.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-2000:]
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "1" and suite.get("skipped") == "1"
    records, _ = read_records(out / "results.jsonl")
    assert {r["nodeid"].split("::")[1]: r["outcome"] for r in records} == {"test_ok": "passed", "test_bad": "failed",
                                                                          "test_skip": "skipped"}
    assert [r["detail"] for r in records if r["outcome"] == "skipped"] == ["Skipped: not here"]


def test_bench_render_rebuilds_the_summary(tmp_path):
    res = tmp_path / "results.jsonl"
    append_record(res, {"kind": "figure", "stage": "A", "metric": "NT-Xent fwd+bwd, fused Triton", "value": 1.25,
                        "unit": "ms", "conditions": "65536 views", "goal": "", "status": "ok"})
    append_record(res, {"kind": "figure", "stage": "A", "metric": "NT-Xent fwd+bwd, PyTorch eager", "value": None,
                        "unit": "ms", "conditions": "65536 views", "goal": "", "status": "OOM"})
    append_record(res, {"kind": "step", "stage": "A", "step": "loss", "status": "timeout", "seconds": 75, "cap_s": 75})
    with open(res, "a") as f:
        f.write('{"kind": "figure", "metr')  # a write cut by a kill
    (tmp_path / "env.json").write_text(json.dumps({"gpus": ["NVIDIA H200"], "driver": "580", "versions": {}}))
    run = subprocess.run([sys.executable, "-m", "bench", "render", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| A | NT-Xent fwd+bwd, fused Triton | 1.25 | ms | 65536 views |  |" in summary
    assert "| A | NT-Xent fwd+bwd, PyTorch eager | OOM | ms |" in summary
    assert "| A | loss | timeout | 75 | 75 |" in summary and "NVIDIA H200" in summary
    assert "1 unreadable line(s)" in summary
    bad = subprocess.run([sys.executable, "-m", "bench", "render", str(tmp_path / "nowhere")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "results.jsonl" in bad.stderr


def test_summary_reports_planned_rows_a_cap_or_the_deadline_left_unmeasured(tmp_path):
    res = tmp_path / "results.jsonl"
    eager, compiled = "DINO vit_small_patch16 step images/s, eager", "DINO vit_small_patch16 step images/s, compile"
    for metric in (eager, compiled):
        append_record(res, {"kind": "plan", "stage": "A", "step": "dino", "metric": metric, "unit": "images/s"})
    append_record(res, {"kind": "figure", "stage": "A", "step": "dino", "metric": eager, "value": 1234.5,
                        "unit": "images/s", "conditions": "eager", "goal": "", "status": "ok"})
    append_record(res, {"kind": "step", "stage": "A", "step": "dino", "status": "timeout", "seconds": 70, "cap_s": 70,
                        "detail": "killed at its cap of 70 s"})
    append_record(res, {"kind": "plan", "stage": "A", "step": "model", "metric": "resnet50 train step images/s, eager",
                        "unit": "images/s"})
    append_record(res, {"kind": "step", "stage": "A", "step": "model", "status": "skipped", "seconds": 0, "cap_s": 80,
                        "detail": "stage deadline reached"})
    append_record(res, {"kind": "plan", "stage": "A", "step": "tests", "metric": "m", "unit": "x"})  # no step record
    assert gpu_check.write_summary(tmp_path) == tmp_path / "summary.md"
    table = [ln for ln in (tmp_path / "summary.md").read_text().splitlines() if ln.startswith("| A | ")]
    assert table[:2] == [
        f"| A | {eager} | 1,234.5 | images/s | eager |  |",
        f"| A | {compiled} | not measured (cap) | images/s | step dino: killed at its cap of 70 s |  |"]
    assert table[2] == ("| A | resnet50 train step images/s, eager | not measured (stage deadline) | images/s | "
                        "step model: stage deadline reached |  |")
    assert table[3].startswith("| A | m | not measured (stopped) | x |")
    # a later run that measures the row answers the earlier plan: no "not measured" line is left for it
    append_record(res, {"kind": "figure", "stage": "A", "step": "dino", "metric": compiled, "value": 2000.0,
                        "unit": "images/s", "conditions": "compile", "goal": "", "status": "ok"})
    gpu_check.write_summary(tmp_path)
    assert "not measured (cap)" not in (tmp_path / "summary.md").read_text()


def test_without_a_gpu_a_real_run_refuses_in_one_line(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU")
    assert gpu_check.main(["--stage", "A", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu-check: no CUDA GPU visible")


@pytest.mark.slow
def test_smoke_loss_step_records_figures_and_returns_few_files(tmp_path):
    """The loss step's code end to end at CPU sizes (--smoke): figures in results.jsonl, summary, logs, <= 8 files."""
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "GPU_CHECK_WORK": str(tmp_path / "work"), "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, str(SCRIPT), "--stage", "A", "--smoke", "--only", "loss", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records, bad = read_records(out / "results.jsonl")
    figures = [r for r in records if r["kind"] == "figure"]
    assert bad == 0 and {r["n_views"] for r in figures} == {64, 128}
    assert all(r["unit"] == "ms" and r["value"] > 0 for r in figures)
    assert [r["status"] for r in records if r["kind"] == "step"] == ["ok"]
    assert "NT-Xent fwd+bwd, PyTorch eager" in (out / "summary.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as tf:
        assert tf.getnames() == ["logs/A-loss.log"]
    assert len(list(out.rglob("*"))) <= 8


@pytest.mark.slow
def test_smoke_dino_step_on_the_simulated_lent_machine(tmp_path):
    """The dino step's own code (the trainer's DINO step through bench.dino_bench) at a tiny size (ViT-Ti/8, 2x32 +
    2x16 px, batch 4, 2 timed steps) under the lent machine's Python: no DALI, webdataset, pydicom or FastAPI."""
    out = tmp_path / "out"
    run, loaded = _lent_run(tmp_path, "--stage", "A", "--smoke", "--only", "dino", "--out", str(out), timeout_s=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {"timm", "trainer.methods.dino", "bench.dino_bench"} <= loaded  # the child's imports are in the list
    assert not loaded & {"webdataset", "pydicom", "fastapi", "nvidia.dali"}, loaded
    records, bad = read_records(out / "results.jsonl")
    assert bad == 0 and [r["status"] for r in records if r["kind"] == "step"] == ["ok"]
    assert [r["metric"] for r in records if r["kind"] == "plan"] == ["DINO vit_tiny_patch8 step images/s, eager"]
    figures = {r["metric"]: r for r in records if r["kind"] == "figure"}
    row = figures["DINO vit_tiny_patch8 step images/s, eager"]
    assert row["value"] > 0 and row["loss_finite"] is True and row["step_ms"] > 0
    assert "2x32 + 2x16 px crops, batch 4" in row["conditions"]
    assert figures["DINO vit_tiny_patch8 step first step (compile) time, eager"]["value"] > 0
    summary = (out / "summary.md").read_text()
    assert "| A | DINO vit_tiny_patch8 step images/s, eager |" in summary and "not measured" not in summary


def test_make_target_runs_stage_a_with_plain_python3():
    run = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "python3 scripts/gpu_check.py --stage A" in run.stdout and ".venv" not in run.stdout
