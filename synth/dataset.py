"""`ingest synth`: procedural chest X-ray phantoms written in the CheXpert-v1.0-small layout (CSV + JPEG tree).

Patients have a fixed anatomy and 1-4 images; findings are drawn per study with CheXpert-like prevalences and
reported as 1 / 0 / -1 / blank like the CheXpert labeler. Deterministic for a seed, whatever the worker count.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from synth.phantom import DEVICES, Findings, sample_anatomy, sample_pose
from synth.preview import save_preview
from synth.render import render_frontal, render_lateral

# The 14 CheXpert labeler observations in the CSV's column order: the published CheXpert-v1.0 header this generator
# writes. A copy of ingest.schema.CHEXPERT_LABELS, because synth sits left of ingest (tests/test_synth.py pins the two).
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
ROOT_NAME = "CheXpert-v1.0-small"
CSV_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
TRUTH_NAME = "synth_truth.csv"
JPEG_QUALITY = 90
IMAGES_PER_PATIENT_P = (0.30, 0.35, 0.20, 0.15)      # 1, 2, 3, 4 images
PATHOLOGIES = [c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices")]

# How the labeler reports a finding: P(-1 | present), P(blank | present), P(0 | absent), P(-1 | absent).
# Tuned so the marginals resemble the real CheXpert train CSV (e.g. Pleural Effusion 39% 1, 16% 0, 5% -1).
REPORTING = {
    "Enlarged Cardiomediastinum": (0.35, 0.05, 0.11, 0.04),
    "Cardiomegaly": (0.18, 0.03, 0.06, 0.01),
    "Lung Opacity": (0.05, 0.02, 0.05, 0.01),
    "Lung Lesion": (0.15, 0.02, 0.01, 0.005),
    "Edema": (0.18, 0.02, 0.12, 0.02),
    "Consolidation": (0.45, 0.02, 0.14, 0.09),
    "Pneumonia": (0.70, 0.05, 0.02, 0.07),
    "Atelectasis": (0.50, 0.02, 0.01, 0.02),
    "Pneumothorax": (0.10, 0.01, 0.30, 0.005),
    "Pleural Effusion": (0.10, 0.01, 0.28, 0.02),
    "Pleural Other": (0.40, 0.05, 0.002, 0.003),
    "Fracture": (0.08, 0.05, 0.012, 0.002),
    "Support Devices": (0.01, 0.01, 0.05, 0.002),
}


@dataclass
class ImagePlan:
    rel_path: str        # relative to --out, e.g. CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
    view: str            # PA | AP | LAT
    age: int
    image_seed: int


@dataclass
class StudyPlan:
    findings: Findings
    truth: dict          # label -> bool (what is drawn)
    labels: dict         # label -> 1.0 / 0.0 / -1.0 / None (what the CSV reports)
    images: list


@dataclass
class PatientPlan:
    index: int           # generation order: the anatomy seed
    split: str           # train | valid
    patient_id: str      # patient00001
    sex: str
    studies: list


def _sample_findings(rng: np.random.Generator, prev: Findings | None, chronic: dict, ap: bool) -> Findings:
    """One study's findings; chronic ones persist per patient, acute ones recur with some persistence."""
    f = Findings()
    side = lambda: int(rng.choice((-1, 1)))  # noqa: E731
    if chronic["cardiomegaly"]:
        f.cardiomegaly = chronic["cardiomegaly"]
    if (chronic["cardiomegaly"] and rng.random() < 0.3) or rng.random() < 0.05:
        f.enlarged_mediastinum = float(rng.uniform(0.04, 0.09))
    had_eff = prev is not None and bool(prev.effusion)
    p_eff = 0.65 if had_eff else (0.45 if chronic["cardiomegaly"] else 0.28)
    if rng.random() < p_eff:
        sides = (-1, 1) if rng.random() < 0.45 else (side(),)
        f.effusion = {s: float(rng.uniform(0.06, 0.35)) for s in sides}
    p_edema = 0.45 if chronic["cardiomegaly"] else 0.16
    if rng.random() < p_edema:
        f.edema = float(rng.uniform(0.25, 0.75))
    if rng.random() < 0.11:
        s = side()
        cu, cv = rng.uniform(0.25, 0.75), rng.uniform(0.35, 0.85)
        f.consolidation = [(s, float(cu + rng.normal(0, 0.08)), float(cv + rng.normal(0, 0.07)),
                            float(rng.uniform(0.1, 0.2)))
                           for _ in range(int(rng.integers(2, 5)))]
        f.pneumonia = bool(rng.random() < 0.5)
    if rng.random() < (0.3 if f.effusion else 0.1):
        f.atelectasis = [(side(), float(rng.uniform(0.6, 0.85)), float(rng.uniform(-0.15, 0.15)))]
    if chronic["lesion"] is not None:
        f.lesion = [chronic["lesion"]]
    if rng.random() < (0.09 if not (prev and prev.pneumothorax) else 0.5):
        f.pneumothorax = (side(), float(rng.uniform(0.12, 0.4)))
    if rng.random() < 0.02:
        f.pleural_other = side()
    if chronic["fracture"] is not None:
        f.fracture = chronic["fracture"]
    if rng.random() < (0.7 if ap else 0.2):
        kinds = [d for d, p in zip(DEVICES, (0.35, 0.6, 0.15 if not chronic["pacer"] else 0.0, 0.5, 0.3))
                 if rng.random() < p]
        kinds += ["pacer"] if chronic["pacer"] else []
        f.devices = tuple(sorted(set(kinds) or {"ecg"}))
    elif chronic["pacer"]:
        f.devices = ("pacer",)
    f.device_seed = int(rng.integers(2**31))
    return f


def _truth(f: Findings) -> dict:
    t = {
        "Enlarged Cardiomediastinum": f.enlarged_mediastinum > 0 or f.cardiomegaly > 0,
        "Cardiomegaly": f.cardiomegaly > 0,
        "Lung Lesion": bool(f.lesion),
        "Edema": f.edema > 0,
        "Consolidation": bool(f.consolidation),
        "Atelectasis": bool(f.atelectasis),
        "Pneumothorax": f.pneumothorax is not None,
        "Pleural Effusion": bool(f.effusion),
        "Pleural Other": f.pleural_other is not None,
        "Fracture": f.fracture is not None,
        "Support Devices": bool(f.devices),
    }
    # CheXpert hierarchy: Lung Opacity is the parent of the parenchymal findings; pneumonia is a clinical call
    t["Lung Opacity"] = t["Consolidation"] or t["Edema"] or t["Atelectasis"] or t["Lung Lesion"]
    t["Pneumonia"] = t["Consolidation"] and f.pneumonia
    t["No Finding"] = not any(t[c] for c in PATHOLOGIES)
    return t


def _report(rng: np.random.Generator, truth: dict, valid: bool) -> dict:
    """CheXpert-labeler-like report: valid (radiologist consensus) is 0/1 everywhere, train has -1 and blanks."""
    if valid:
        return {c: 1.0 if truth[c] else 0.0 for c in CHEXPERT_LABELS}
    out = {"No Finding": 1.0 if truth["No Finding"] else None}
    for c in CHEXPERT_LABELS[1:]:
        p_unc, p_blank, p_zero, p_unc_neg = REPORTING[c]
        r = rng.random()
        if truth[c]:
            out[c] = -1.0 if r < p_unc else (None if r < p_unc + p_blank else 1.0)
        else:
            out[c] = 0.0 if r < p_zero else (-1.0 if r < p_zero + p_unc_neg else None)
    return out


def plan_dataset(n_images: int, seed: int, valid_frac: float = 0.1, lateral_frac: float = 0.15) -> list[PatientPlan]:
    """Who, which studies and views, which findings and labels: sequential and cheap; rendering is separate."""
    rng = np.random.default_rng([seed, 7])
    raw = []
    total = 0
    while total < n_images:
        k = min(int(rng.choice(4, p=IMAGES_PER_PATIENT_P)) + 1, n_images - total)
        total += k
        raw.append((k, "valid" if rng.random() < valid_frac else "train"))
    n_train = sum(1 for _, s in raw if s == "train")
    counters = {"train": 0, "valid": n_train}   # like CheXpert, valid patients are numbered after train ones
    patients = []
    for index, (k, split) in enumerate(raw):
        counters[split] += 1
        sex = "Male" if rng.random() < 0.59 else "Female"
        age = int(np.clip(rng.normal(61, 17), 18, 90))
        inpatient = rng.random() < 0.75
        chronic = {
            "cardiomegaly": float(rng.uniform(0.08, 0.2)) if rng.random() < 0.15 else 0.0,
            "lesion": ((int(rng.choice((-1, 1))), float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.25, 0.75)),
                        float(rng.uniform(0.025, 0.08))) if rng.random() < 0.04 else None),
            "fracture": ((int(rng.choice((-1, 1))), int(rng.integers(3, 9)), float(rng.uniform(0.45, 0.75)))
                         if rng.random() < 0.04 else None),
            "pacer": rng.random() < 0.05,
        }
        # split k images into studies: each study has a frontal, some also a lateral
        studies_views: list[list[str]] = []
        left = k
        while left > 0:
            lateral = left >= 2 and rng.random() < lateral_frac * 2.2
            studies_views.append(["F", "L"] if lateral else ["F"])
            left -= len(studies_views[-1])
        prev = None
        studies = []
        for s_i, views in enumerate(studies_views):
            ap = rng.random() < (0.88 if inpatient else 0.25)
            f = _sample_findings(rng, prev, chronic, ap)
            truth = _truth(f)
            labels = _report(rng, truth, split == "valid")
            images = []
            for v_i, kind in enumerate(views, start=1):
                name = f"view{v_i}_{'frontal' if kind == 'F' else 'lateral'}.jpg"
                rel = f"{ROOT_NAME}/{split}/patient{counters[split]:05d}/study{s_i + 1}/{name}"
                images.append(ImagePlan(rel, ("AP" if ap else "PA") if kind == "F" else "LAT", age + s_i,
                                        int(rng.integers(2**31))))
            studies.append(StudyPlan(f, truth, labels, images))
            prev = f
        patients.append(PatientPlan(index, split, f"patient{counters[split]:05d}", sex, studies))
    return patients


def render_image(patient: PatientPlan, study: StudyPlan, image: ImagePlan, seed: int, size_px: int) -> np.ndarray:
    """Render one planned image: width ``size_px``, height 1.0-1.25x (portrait, like CheXpert-small)."""
    anat = sample_anatomy(np.random.default_rng([seed, 11, patient.index]), patient.sex, image.age)
    rng = np.random.default_rng([seed, 13, image.image_seed])
    height_px = int(round(size_px * rng.uniform(1.0, 1.25)))
    pose = sample_pose(rng, image.view)
    if image.view == "LAT":
        return render_lateral(anat, study.findings, pose, height_px, size_px, rng)
    return render_frontal(anat, study.findings, pose, image.view, height_px, size_px, rng)


def _jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


def _render_patient(args) -> int:
    patient, seed, size_px, out = args
    for study in patient.studies:
        for image in study.images:
            path = out / image.rel_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg_bytes(render_image(patient, study, image, seed, size_px)))
    return sum(len(s.images) for s in patient.studies)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.1f}"


def write_csvs(patients: list[PatientPlan], out: Path) -> None:
    """train.csv / valid.csv exactly like CheXpert's, plus synth_truth.csv (what was drawn, for tests and analysis)."""
    root = out / ROOT_NAME
    truth_cols = ["Path", *CHEXPERT_LABELS, "ctr"]
    files = {s: open(root / f"{s}.csv", "w", newline="") for s in ("train", "valid")}
    truth_f = open(root / TRUTH_NAME, "w", newline="")
    try:
        writers = {s: csv.writer(f, lineterminator="\n") for s, f in files.items()}
        for w in writers.values():
            w.writerow(CSV_HEADER)
        truth_w = csv.writer(truth_f, lineterminator="\n")
        truth_w.writerow(truth_cols)
        for p in patients:
            for st in p.studies:
                for im in st.images:
                    lateral = im.view == "LAT"
                    writers[p.split].writerow([im.rel_path, p.sex, im.age, "Lateral" if lateral else "Frontal",
                                               "" if lateral else im.view,
                                               *(_fmt(st.labels[c]) for c in CHEXPERT_LABELS)])
                    truth_w.writerow([im.rel_path, *(int(st.truth[c]) for c in CHEXPERT_LABELS),
                                      f"{st.findings.cardiomegaly:.3f}"])
    finally:
        for f in files.values():
            f.close()
        truth_f.close()


def preview_from_plan(patients: list[PatientPlan], seed: int, size_px: int, path: str | Path, count: int = 12) -> Path:
    """Grid of the first ``count`` images, each captioned with its positive findings."""
    images, captions = [], []
    for p in patients:
        for st in p.studies:
            for im in st.images:
                if len(images) >= count:
                    break
                images.append(render_image(p, st, im, seed, size_px))
                pos = [c for c in CHEXPERT_LABELS if st.truth[c] and c != "No Finding"]
                short = ", ".join(c.replace("Pleural ", "").replace("Enlarged Cardiomediastinum", "Wide med.")
                                  for c in pos) or "no finding"
                captions.append(f"{im.view}: {short}")
    return save_preview(images, captions, path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ingest synth", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder; gets CheXpert-v1.0-small/{train,valid}.csv and JPEGs")
    ap.add_argument("--n", type=int, default=3000, help="number of images (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=320, help="image width in pixels (height 1.0-1.25x; default 320)")
    ap.add_argument("--valid-frac", type=float, default=0.1, help="fraction of patients in valid.csv (default 0.1)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: all cores)")
    ap.add_argument("--preview", help="also write a PNG grid of the first 12 images here")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset in --out")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be >= 1 (got {args.n})")
    if not 64 <= args.size <= 2048:
        ap.error(f"--size must be in [64, 2048] (got {args.size})")
    if not 0.0 <= args.valid_frac < 1.0:
        ap.error(f"--valid-frac must be in [0, 1) (got {args.valid_frac})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    root = out / ROOT_NAME
    if (root / "train.csv").exists() and not args.overwrite:
        print(f"ingest synth: {root / 'train.csv'} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    patients = plan_dataset(args.n, args.seed, args.valid_frac)
    jobs = [(p, args.seed, args.size, out) for p in patients]
    if args.workers > 1:
        import multiprocessing as mp
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with mp.get_context("fork").Pool(args.workers) as pool:
            done = sum(pool.imap_unordered(_render_patient, jobs, chunksize=8))
    else:
        done = sum(map(_render_patient, jobs))
    write_csvs(patients, out)
    (root / "synth_meta.json").write_text(json.dumps(
        {"generator": "ingest synth", "seed": args.seed, "n_images": done, "size_px": args.size,
         "valid_frac": args.valid_frac, "patients": len(patients)}, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    n_valid = sum(len(s.images) for p in patients if p.split == "valid" for s in p.studies)
    print(f"ingest synth: {done} images ({done - n_valid} train, {n_valid} valid) of {len(patients)} patients "
          f"in {seconds:.1f} s ({done / seconds:.0f} images/s, {args.workers} workers) -> {root}")
    if args.preview:
        print(f"preview: {preview_from_plan(patients, args.seed, args.size, args.preview)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
