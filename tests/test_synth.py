"""`ingest synth` (the synth package): deterministic CheXpert-layout output, CheXpert-like CSVs, and findings that
really change the image."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ingest.schema import CHEXPERT_LABELS
from synth.dataset import CSV_HEADER, ROOT_NAME, main, plan_dataset
from synth.phantom import Findings, Frame, Pose, sample_anatomy
from synth.render import render_frontal

PATH_RE = re.compile(r"^CheXpert-v1\.0-small/(train|valid)/patient\d{5}/study\d+/view\d_(frontal|lateral)\.jpg$")
LABEL_VALUES = {"", "1.0", "0.0", "-1.0"}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert main(["--out", str(out), "--n", "40", "--size", "96", "--seed", "3", "--workers", "1"]) == 0
    return out


def test_rerun_is_byte_identical_and_worker_count_does_not_matter(small_set, tmp_path):
    assert main(["--out", str(tmp_path), "--n", "40", "--size", "96", "--seed", "3", "--workers", "2"]) == 0
    a, b = _files(small_set), _files(tmp_path)
    assert a.keys() == b.keys() and a == b
    assert main(["--out", str(tmp_path / "other"), "--n", "40", "--size", "96", "--seed", "4", "--workers", "1"]) == 0
    c = _files(tmp_path / "other")
    assert sum(a[k] == c.get(k) for k in a if k.endswith(".jpg")) == 0   # another seed: other images


def test_ingest_cli_dispatches_synth_to_the_synth_package(tmp_path):
    from ingest.cli import main as ingest_main
    assert ingest_main(["synth", "--out", str(tmp_path), "--n", "3", "--size", "64", "--seed", "3",
                        "--workers", "1"]) == 0
    with open(tmp_path / ROOT_NAME / "train.csv", newline="") as f:
        assert next(csv.reader(f)) == CSV_HEADER


def test_synth_label_columns_are_the_shard_schema_labels():
    """synth keeps its own copy of the CheXpert columns (it sits left of ingest); the two must never drift."""
    from synth.dataset import CHEXPERT_LABELS as SYNTH_LABELS
    assert SYNTH_LABELS == CHEXPERT_LABELS


def test_layout_and_csvs_parse_like_chexpert(small_set):
    root = small_set / ROOT_NAME
    rows = {}
    for split in ("train", "valid"):
        with open(root / f"{split}.csv", newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == CSV_HEADER
            rows[split] = list(reader)
    all_rows = rows["train"] + rows["valid"]
    assert len(all_rows) == 40 and rows["valid"], "valid.csv should hold some patients"
    for r in all_rows:
        assert PATH_RE.match(r[0]), r[0]
        assert (root.parent / r[0]).is_file()
        assert r[1] in ("Male", "Female") and r[2].isdigit()
        assert (r[3], r[4] in ("AP", "PA")) in (("Frontal", True), ("Lateral", False)) \
            and (r[3] == "Frontal" or r[4] == "")
        assert set(r[5:]) <= LABEL_VALUES
    assert any(r[3] == "Lateral" for r in all_rows)
    # valid.csv is the radiologist-consensus set: 0/1 everywhere, like CheXpert's
    assert {v for r in rows["valid"] for v in r[5:]} <= {"0.0", "1.0"}
    train_patients = {r[0].split("/")[2] for r in rows["train"]}
    valid_patients = {r[0].split("/")[2] for r in rows["valid"]}
    assert not train_patients & valid_patients
    assert max(valid_patients) > max(train_patients)     # numbered after train, like patient64541+
    with open(root / "train.csv", newline="") as f:
        df = pd.read_csv(f)
    assert list(df.columns) == CSV_HEADER
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(root.parent / all_rows[0][0]))
    assert img.dtype == np.uint8 and img.ndim == 2 and img.shape[1] == 96 and 96 <= img.shape[0] <= 120


def test_header_and_value_set_match_the_real_chexpert_csv(small_set, shared_data):
    real = shared_data / "metadata" / "chexpert_train.csv.gz"
    with __import__("gzip").open(real, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        real_values = {v for _, r in zip(range(5000), reader) for v in r[5:]}
    assert header == CSV_HEADER
    with open(small_set / ROOT_NAME / "train.csv", newline="") as f:
        ours = {v for r in list(csv.reader(f))[1:] for v in r[5:]}
    assert ours <= real_values == LABEL_VALUES


def test_label_marginals_and_patients_resemble_chexpert():
    patients = plan_dataset(3000, seed=0)
    rows = [(p, st, im) for p in patients for st in p.studies for im in st.images]
    assert len(rows) == 3000
    train = [st.labels for p, st, _ in rows if p.split == "train"]

    def rate(label, value):
        return np.mean([lab[label] == value for lab in train])

    # the real CheXpert train CSV: effusion 39% positive, devices 52%, opacity 47%, cardiomegaly 12%, no finding 10%
    assert 0.25 < rate("Pleural Effusion", 1.0) < 0.5
    assert 0.35 < rate("Support Devices", 1.0) < 0.7
    assert 0.25 < rate("Lung Opacity", 1.0) < 0.6
    assert 0.05 < rate("Cardiomegaly", 1.0) < 0.25
    assert 0.05 < rate("No Finding", 1.0) < 0.4
    assert 0.03 < rate("Consolidation", -1.0) and 0.03 < rate("Atelectasis", -1.0)
    for label in CHEXPERT_LABELS:
        assert rate(label, None) > 0.2, label                 # blanks everywhere, as in the labeler's output
    lateral = np.mean([im.view == "LAT" for _, _, im in rows])
    assert 0.08 < lateral < 0.25
    per_patient = np.bincount([sum(len(s.images) for s in p.studies) for p in patients])
    assert per_patient[1] > 0 and per_patient[2:].sum() > per_patient[1]   # most patients have 2+ images (MICLe)
    assert per_patient.size <= 5


def _heart_ctr(img: np.ndarray) -> float:
    """Cardiothoracic ratio read off the image. Lungs: the two largest dark blobs of the mid / lower chest; heart
    width: the gap between them at heart level (lower half, where the lungs are still broad); thorax: their span."""
    from PIL import Image, ImageFilter
    from scipy import ndimage
    smooth = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(img.shape[1] / 100)), float)
    h, w = smooth.shape
    band = smooth[int(0.3 * h): int(0.85 * h), int(0.03 * w): int(0.97 * w)]   # below the shoulders' air gaps
    lung_level = np.percentile(band, 5)
    bright_level = np.median(band[:, band.shape[1] // 2 - 2: band.shape[1] // 2 + 2])
    dark = ndimage.binary_opening(band < lung_level + 0.25 * (bright_level - lung_level), iterations=2)
    labels, n = ndimage.label(dark)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    sizes[np.unique(np.r_[labels[:, 0], labels[:, -1]])] = 0     # thin body edges / air at the image sides
    lungs = np.isin(labels, np.argsort(sizes)[::-1][:2])
    c = band.shape[1] // 2
    rows = np.flatnonzero(lungs[:, :c].any(axis=1) & lungs[:, c:].any(axis=1))
    spans, gaps, aerated = [], [], []
    for r in rows:
        cols = np.flatnonzero(lungs[r])
        left, right = cols[cols < c], cols[cols >= c]
        spans.append(right.max() - left.min())
        gaps.append(right.min() - left.max())
        aerated.append(cols.size)
    aerated = np.asarray(aerated)
    if aerated.size < 5:
        return float("nan")     # lungs not separable at this exposure
    heart_rows = (rows > (rows[0] + rows[-1]) / 2) & (aerated > 0.6 * aerated.max())
    return float(np.percentile(np.asarray(gaps)[heart_rows], 80) / np.percentile(spans, 90))


POSE = Pose(rotation_deg=1.0, marker=False)


def _pair(finding: Findings, seed: int, view: str = "PA", size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """The same patient, pose and noise with and without a finding."""
    anat = sample_anatomy(np.random.default_rng(seed), "Male", 60)
    base = render_frontal(anat, Findings(), POSE, view, int(size * 1.2), size, np.random.default_rng(seed))
    ill = render_frontal(anat, finding, POSE, view, int(size * 1.2), size, np.random.default_rng(seed))
    return base, ill


def _box(seed: int, shape, x: float, y: float, half: float = 0.06):
    """Pixel box around an anatomical point of the ``_pair`` patient (x, y in anatomical units)."""
    frame = Frame(shape[0], shape[1], POSE)
    (j, i), = frame.to_px([(x, y)])
    r = max(2, int(half * frame.unit_px))
    return np.s_[int(i) - r: int(i) + r, int(j) - r: int(j) + r]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cardiomegaly_raises_the_measured_cardiothoracic_ratio(seed):
    base, ill = _pair(Findings(cardiomegaly=0.14), seed)
    ctr0, ctr1 = _heart_ctr(base), _heart_ctr(ill)
    assert ctr0 < 0.5 < ctr1, (ctr0, ctr1)


def test_cardiomegaly_labels_match_measured_ctr_across_a_dataset():
    """Random poses, exposures and co-occurring findings: the measured CTR still separates the label."""
    from synth.dataset import render_image
    ctr = {True: [], False: []}
    for p in plan_dataset(200, seed=5):
        for st in p.studies:
            for im in st.images:
                if im.view != "LAT":
                    ctr[st.truth["Cardiomegaly"]].append(_heart_ctr(render_image(p, st, im, 5, 128)))
    assert len(ctr[True]) >= 10 and len(ctr[False]) >= 50
    assert np.isfinite(ctr[True] + ctr[False]).mean() > 0.9
    assert np.nanmedian(ctr[False]) < 0.52 and np.nanmedian(ctr[True]) > np.nanmedian(ctr[False]) + 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effusion_fills_the_costophrenic_angles(seed):
    base, ill = _pair(Findings(effusion={-1: 0.25, 1: 0.2}), seed)
    anat = sample_anatomy(np.random.default_rng(seed), "Male", 60)
    for side in (-1, 1):   # where the sharp, dark costophrenic angles were
        box = _box(seed, base.shape, side * (anat.thorax_hw - 0.05), anat.base_y - 0.13, half=0.035)
        assert ill[box].mean() > base[box].mean() + 20, side


@pytest.mark.parametrize("seed", [0, 1])
def test_consolidation_is_a_dense_patch_and_pneumothorax_removes_markings(seed):
    anat = sample_anatomy(np.random.default_rng(seed), "Male", 60)
    height = anat.base_y - anat.apex_y
    base, ill = _pair(Findings(consolidation=[(-1, 0.5, 0.55, 0.15)]), seed)
    box = _box(seed, base.shape, -(anat.medi_hw + anat.thorax_hw) / 2, anat.apex_y + 0.55 * height, half=0.06)
    assert ill[box].mean() > base[box].mean() + 20
    base, ptx = _pair(Findings(pneumothorax=(1, 0.35)), seed)
    lateral = anat.thorax_hw * (1 - 0.5 * 0.65 ** 3)     # lung edge at 35% of its height (synth/frontal.py geometry)
    rim = _box(seed, base.shape, lateral - 0.07, anat.apex_y + 0.35 * height, half=0.035)
    texture = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()      # noqa: E731  (ribs run across rows)
    assert texture(ptx[rim]) < texture(base[rim])
    assert ptx[rim].mean() < base[rim].mean()


def test_same_patient_images_share_anatomy():
    """Two images of one patient are more alike than images of different patients (MICLe positives)."""
    from synth.dataset import render_image
    patients = [p for p in plan_dataset(200, seed=2) if sum(im.view == "PA" or im.view == "AP"
                                                           for s in p.studies for im in s.images) >= 2][:6]
    small = []
    for p in patients:
        imgs = [render_image(p, s, im, 2, 96) for s in p.studies for im in s.images if im.view != "LAT"][:2]
        small.append([np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(i).resize((24, 28)),
                                 float).ravel()
                      for i in imgs])
    corr = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    same = np.mean([corr(a, b) for a, b in small])
    other = np.mean([corr(small[i][0], small[j][1]) for i in range(len(small)) for j in range(len(small)) if i != j])
    assert same > other


def test_refuses_to_overwrite_and_rejects_bad_arguments(small_set, capsys):
    assert main(["--out", str(small_set), "--n", "5", "--size", "96"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--out", str(small_set), "--n", "0"])
    assert e.value.code == 2


def test_preview_grid(tmp_path):
    png = tmp_path / "grid.png"
    assert main(["--out", str(tmp_path / "d"), "--n", "6", "--size", "64", "--workers", "1",
                 "--preview", str(png)]) == 0
    from PIL import Image
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 4 * 200


def test_preview_captions_sit_directly_under_their_films(tmp_path):
    import numpy as np
    from PIL import Image

    from synth.preview import save_preview

    films = [np.full((h, 64), 200, np.uint8) for h in (64, 80, 72)]  # portrait renders smaller than the tile
    path = save_preview(films, ["PA: Effusion", "AP: no finding", "LAT: " + "Edema, " * 20], tmp_path / "p.png",
                        columns=2, tile_px=128)
    grid = np.asarray(Image.open(path))
    for col in (0, 1):
        x = 6 + col * (128 + 6) + 120  # inside the film's right edge, clear of caption text
        column = grid[:, x]
        film_rows = np.flatnonzero(column == 200)
        first_band_row = film_rows[-1] + 1
        assert film_rows.size >= 128, "the film was not scaled to the tile width"
        assert column[first_band_row] == 48, "a blank band separates the film from its caption"
    # the two films of the first row end on the same line, so the captions line up
    ends = [np.flatnonzero(grid[:200, 6 + c * 134 + 120] == 200)[-1] for c in (0, 1)]
    assert ends[0] == ends[1]
