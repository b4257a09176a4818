"""A real bundle for tests: small synthetic shards -> `eval linear` (seeded random ResNet-18) -> `eval export`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--arch", "resnet18", "--image-size", "64", "--resize-size", "72", "--batch-size", "16", "--bootstrap", "100"]


def make_bundle(root: Path, *extra: str) -> Path:
    from eval.__main__ import main as eval_main
    from shardgen import make_shards
    shards = make_shards(root / "shards", num_patients=36, size_px=72, seed=3)
    out = root / "eval"
    rc = eval_main(["linear", "--shards", str(shards), "--out", str(out), "--init", "random", *FAST])
    assert rc == 0, "eval linear failed"
    bundle = root / "bundle"
    rc = eval_main(["export", "--out", str(out), "--encoder", "random-resnet18", "--protocol", "linear",
                    "--bundle", str(bundle), *extra])
    assert rc == 0, "eval export failed"
    return bundle


@contextmanager
def running_server(bundle: Path, *extra: str, token: str | None = None):
    """`python -m serve` in a subprocess on a free 127.0.0.1 port; yields the base URL, stops it after."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "serve", "--bundle", str(bundle), "--port", str(port), *extra]
    if token:
        cmd += ["--token", token]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"x-token": token} if token else {}
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(url + "/api/health", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not answer /api/health within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def synth_phantom(folder: Path) -> Path:
    """One frontal `ingest synth` phantom JPEG (generated, not a patient's film)."""
    subprocess.run([sys.executable, "-m", "ingest", "synth", "--out", str(folder), "--n", "6", "--size", "320",
                    "--seed", "4"], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    return sorted(folder.rglob("*frontal.jpg"))[0]


def make_phantom_bundle(root: Path) -> Path:
    """A bundle over `ingest synth` phantoms (CheXpert layout, the five competition tasks): what the page's
    screenshot shows. Seeded random ResNet-18, so its scores are honest and weak."""
    from eval.__main__ import main as eval_main
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for cmd in (["synth", "--out", str(root / "raw"), "--n", "300", "--size", "128", "--seed", "0",
                 "--valid-frac", "0.2"],
                ["build-shards", "--source", "chexpert", "--root", str(root / "raw" / "CheXpert-v1.0-small"),
                 "--out", str(root / "shards"), "--size", "72", "--val-frac", "0.2", "--no-progress"]):
        subprocess.run([sys.executable, "-m", "ingest", *cmd], check=True, cwd=ROOT, env=env, capture_output=True)
    out = root / "eval"
    rc = eval_main(["linear", "--shards", str(root / "shards"), "--out", str(out), "--init", "random",
                    "--tasks", "chexpert5",
                    *FAST])
    assert rc == 0, "eval linear failed"
    rc = eval_main(["export", "--out", str(out), "--encoder", "random-resnet18", "--protocol", "linear",
                    "--bundle", str(root / "bundle")])
    assert rc == 0, "eval export failed"
    return root / "bundle"
