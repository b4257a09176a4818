"""A real browser (Debian's chromium, headless, through Selenium and the system chromedriver: nothing downloaded)
uploads a real chest X-ray to `python -m serve` and reads the rendered findings; a phantom's page is screenshotted
(SERVE_SCREENSHOT=PATH keeps a copy, e.g. docs/serve.png)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium + chromedriver not installed "
                                 "(.ci/run installs Debian's chromium and chromium-driver)"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("selenium")
    from bundlegen import make_phantom_bundle, running_server
    root = tmp_path_factory.mktemp("browser")
    bundle = make_phantom_bundle(root)
    with running_server(bundle, "--neighbours", str(root / "shards"), "--k", "4") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def _upload(browser, url: str, path: Path) -> list[list[str]]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(url + "/")
    assert "Research software, not a diagnosis" in browser.find_element(By.ID, "notice").text
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 120).until(EC.text_to_be_present_in_element((By.ID, "status"), "Done"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#findings tbody tr")
    return [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]


def test_real_xray_findings_rendered(server, browser, shared_data):
    from selenium.webdriver.common.by import By
    film = sorted((shared_data / "pneumonia-mini" / "Normal").glob("*.jp*g"))[0]
    rows = _upload(browser, server, film)
    assert rows, "no findings rendered"
    for name, prob, thr, reading, auroc in rows:
        assert name and 0 <= float(prob) <= 1
        if reading == "not validated":  # exported without a threshold (validation AUROC at chance)
            assert thr == "none"
            continue
        assert 0 <= float(thr) <= 1
        if abs(float(prob) - float(thr)) > 0.001:  # the table rounds to 3 decimals
            assert reading == ("above threshold" if float(prob) > float(thr) else "below threshold")
        assert reading in ("above threshold", "below threshold")
    assert browser.find_element(By.ID, "seen").get_attribute("src").startswith("data:image/png")
    assert browser.find_element(By.ID, "saliency").get_attribute("src").startswith("data:image/png")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#neighbours .neighbour")) == 4
    # A text file renamed .png: the page shows the server's one-line reason, and the next upload works again.
    bad = Path(os.environ.get("TMPDIR", "/tmp")) / f"notes-{os.getpid()}.png"
    bad.write_text("not an image")
    try:
        browser.find_element(By.ID, "file").send_keys(str(bad))
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(browser, 60).until(EC.text_to_be_present_in_element((By.ID, "status"),
                                                                          "not a JPEG, PNG or DICOM"))
    finally:
        bad.unlink()
    assert _upload(browser, server, film) == rows


def test_phantom_screenshot(server, browser, tmp_path):
    from bundlegen import synth_phantom
    rows = _upload(browser, server, synth_phantom(tmp_path / "synth"))
    assert rows
    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get("SERVE_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
