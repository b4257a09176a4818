"""`python -m bench scale --quick`: every family measured at two sizes through the real code, exponents fitted,
goals judged, JSON + Markdown + log-log plot written; and the fit itself on known curves."""
from __future__ import annotations

import json

import pytest

from bench import scale_bench


def test_scale_quick_smoke(shared_data, tmp_path, capsys):
    rc = scale_bench.main(["--quick", "--in-process", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "scale.json").read_text())
    rows = doc["rows"]
    assert {r["family"] for r in rows} == set(scale_bench.FAMILIES)
    for family, sizes in scale_bench.QUICK_SIZES.items():
        assert sorted({r["n"] for r in rows if r["family"] == family}) == sizes, family
    assert all(r["median_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    # the pixel-free build-shards wrote a complete manifest: every record accounted for
    for r in rows:
        if r["family"].startswith("ingest-") and r["case_peak"]:
            c = r["check"]
            assert c["inputs"] == r["n"] == c["written"] + c["rejected"] + c["filtered"] and c["written"] > 0
    stages = {(r["family"], r["stage"]) for r in rows}
    assert ("ingest-chexpert", scale_bench.PLAN_STAGE) in stages and ("reader", "until the first batch") in stages
    fitted = {(f["family"], f["stage"]): f for f in doc["fits"] if "time_exponent" in f}
    assert fitted.keys() == stages, "every stage gets a time exponent"
    assert all(isinstance(f["time_exponent"], float) for f in fitted.values())
    assert len(doc["goals"]) == len(fitted)  # no 377k row in --quick: only the exponent goals
    out = capsys.readouterr().out
    assert "fitted exponents" in out and "goals:" in out
    assert (tmp_path / "scale.png").stat().st_size > 10_000
    md = (tmp_path / "scale.md").read_text()
    assert "![cost against size](scale.png)" in md and "## Fitted exponents" in md


def test_fit_exponent_recovers_known_slopes():
    sizes = [10_000, 100_000, 377_110]
    assert scale_bench.fit_exponent(sizes, [3e-6 * n for n in sizes]) == pytest.approx(1.0)
    assert scale_bench.fit_exponent(sizes, [1e-9 * n * n for n in sizes]) == pytest.approx(2.0)
    assert scale_bench.fit_exponent([5, 5], [1.0, 2.0]) is None


def test_goals_flag_a_quadratic_stage_and_a_slow_plan():
    rows = [{"family": "ingest-x", "stage": scale_bench.PLAN_STAGE, "n": n, "median_s": 1e-9 * n * n,
             "peak_rss_mib": 900.0, "rss_base_mib": 100.0, "case_peak": True} for n in (10_000, 377_110)]
    judged = {g["goal"]: g["ok"] for g in scale_bench.goals(rows, scale_bench.fits(rows))}
    assert judged == {f"ingest-x: {scale_bench.PLAN_STAGE} time exponent <= 1.1": False,
                      "ingest-x: 377k plan < 60 s": False, "ingest-x: 377k plan peak RSS < 2048 MiB": True}


def test_unknown_family_is_a_usage_error(capsys):
    assert scale_bench.main(["--families", "ingest-chexpert,warp", "--no-save"]) == 2
    assert "warp" in capsys.readouterr().err
