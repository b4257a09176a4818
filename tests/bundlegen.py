"""A real bundle for tests: small synthetic shards -> `eval linear` (seeded random ResNet-18) -> `eval export`."""
from __future__ import annotations

from pathlib import Path

FAST = ["--arch", "resnet18", "--image-size", "32", "--resize-size", "36", "--batch-size", "16", "--bootstrap", "100"]


def make_bundle(root: Path, *extra: str) -> Path:
    from eval.__main__ import main as eval_main
    from shardgen import make_shards
    shards = make_shards(root / "shards", num_patients=36, size_px=48, seed=3)
    out = root / "eval"
    rc = eval_main(["linear", "--shards", str(shards), "--out", str(out), "--init", "random", *FAST])
    assert rc == 0, "eval linear failed"
    bundle = root / "bundle"
    rc = eval_main(["export", "--out", str(out), "--encoder", "random-resnet18", "--protocol", "linear",
                    "--bundle", str(bundle), *extra])
    assert rc == 0, "eval export failed"
    return bundle
