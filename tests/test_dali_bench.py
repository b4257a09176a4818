"""`python -m bench data --quick`: the DALI-vs-torchvision benchmark runs end to end on the CPU and writes JSON."""
from __future__ import annotations

import json
import math

from bench.data_bench import main


def test_bench_data_quick_writes_rows(tmp_path):
    out = tmp_path / "data.json"
    assert main(["--quick", "--threads", "1", "--devices", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    loaders = {r["loader"] for r in doc["rows"]}
    assert loaders == {"dali-cpu", "torchvision+webdataset"}
    for r in doc["rows"]:
        assert r["samples_per_s"] > 0 and math.isclose(r["views_per_s"], 2 * r["samples_per_s"])
        assert r["cpu_cores_used"] >= 0  # /proc ticks are 10 ms: a tiny timed window may round to 0
    assert doc["command"].startswith("python -m bench data --quick")


def test_bench_data_bad_shards_is_a_one_line_error(tmp_path, capsys):
    assert main(["--shards", str(tmp_path / "missing"), "--devices", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
