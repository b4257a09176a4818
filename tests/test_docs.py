"""The project's own design page and licence: present in the repo, linked from the README, in step with pyproject."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_design_page_covers_the_contracts_and_the_readme_links_it():
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    headings = set(re.findall(r"^## (.+)$", design, flags=re.M))
    assert {"Layers", "Commands", "Shards", "From shard to loss", "Configuration", "Run folder", "Bundle",
            "Tests"} <= headings
    for command in ("ingest build-shards", "trainer/pretrain.py", "python -m eval", "python -m bench",
                    "python -m serve", "make test", "make demo", "make gpu-check"):
        assert command in design, command
    for member in ("`.jpg`", "`.json`", "`.lbl`", "`.pid`", "manifest.json", "RUN/encoder.pt", "weights_only=True"):
        assert member in design, member
    assert "](docs/DESIGN.md)" in (ROOT / "README.md").read_text()


def test_license_is_the_apache_2_text_that_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
