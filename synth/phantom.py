"""The phantom's types (anatomy, findings, pose), their samplers and the pixel <-> anatomy frame the renderers share.

Shapes live in anatomical coordinates (x, y in image half-widths, patient's right on image left); the pose is an affine
map, so a patient's anatomy and lung texture stay fixed while each image moves. Imports nothing of the project."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

TEXTURE_EXTENT = 1.6      # noise fields cover [-1.6, 1.6]^2 anatomical units
SIDES = (-1, 1)           # -1: patient's right lung (image left), +1: patient's left lung


def ramp(d, width: float):
    """Soft inside-indicator of a signed distance-like quantity (> 0 inside), edge ``width`` wide."""
    return np.clip(d * (1.0 / width) + 0.5, 0.0, 1.0)


@dataclass
class Anatomy:
    """Fixed per patient: body habitus, lung / heart geometry, rib cage, bone density and lung texture."""
    sex: str
    age: int
    thorax_hw: float          # rib-cage half-width at the costophrenic angles
    apex_y: float             # lung apices
    base_y: float             # costophrenic angles
    dome_h: float             # hemidiaphragm dome height above the costophrenic angle (lung-height fraction)
    right_dome_up: float      # the right hemidiaphragm sits higher (liver)
    medi_hw: float            # upper mediastinum half-width
    ctr: float                # cardiothoracic ratio without cardiomegaly
    heart_ry: float
    heart_tilt: float
    hilum_y: float
    rib_y0: float
    rib_gap: float
    rib_gap_growth: float
    rib_rise: float
    rib_curve: float
    bone: float               # bone contrast (osteopenia with age)
    soft: float               # soft-tissue attenuation (habitus)
    body_hw: float
    breast: float             # 0 for most men
    textures: list = field(repr=False, default_factory=list)   # small float32 noise fields in anatomical coords


@dataclass
class Findings:
    """What is present in one study (all its views). Side -1 = patient's right, +1 = patient's left."""
    cardiomegaly: float = 0.0                 # added cardiothoracic ratio
    enlarged_mediastinum: float = 0.0         # added upper-mediastinum half-width
    effusion: dict = field(default_factory=dict)       # side -> fluid height (fraction of lung height)
    consolidation: list = field(default_factory=list)  # (side, u, v, radius)
    edema: float = 0.0
    atelectasis: list = field(default_factory=list)    # (side, v, tilt)
    lesion: list = field(default_factory=list)         # (side, u, v, radius)
    pneumothorax: tuple | None = None                  # (side, rim width as lung-width fraction)
    pleural_other: int | None = None                   # side with pleural thickening
    fracture: tuple | None = None                      # (side, rib index, lateral position)
    devices: tuple = ()                                # subset of DEVICES
    pneumonia: bool = False                            # a clinical call on a consolidation; not drawn separately
    device_seed: int = 0


DEVICES = ("ett", "cvc", "pacer", "ecg", "ngt")


@dataclass
class Pose:
    """Per image: position, inspiration, exposure and detector processing."""
    rotation_deg: float = 0.0
    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    inspiration: float = 0.0      # + lowers the diaphragm
    exposure: float = 2.6         # film-curve steepness
    level: float = 0.56           # attenuation shown as mid-grey (kVp / mAs / processing LUT)
    gamma: float = 1.0
    window_lo: float = 0.0
    window_hi: float = 1.0
    noise: float = 0.02
    blur_px: float = 0.6
    sharpen: float = 60.0         # unsharp-mask percent (edge enhancement of CR/DR processing)
    heel: float = 0.0             # top-to-bottom exposure gradient
    marker: bool = True


def sample_anatomy(rng: np.random.Generator, sex: str, age: int) -> Anatomy:
    female = sex == "Female"
    n = lambda mu, sd, lo, hi: float(np.clip(rng.normal(mu, sd), lo, hi))  # noqa: E731
    tex = [rng.standard_normal((cells, cells)).astype(np.float32) for cells in (9, 16, 30, 60)]
    thorax_hw = n(0.80 if female else 0.84, 0.03, 0.72, 0.92)
    return Anatomy(
        sex=sex, age=age,
        thorax_hw=thorax_hw,
        apex_y=n(-0.86, 0.04, -0.98, -0.74), base_y=n(0.50, 0.05, 0.38, 0.62),
        dome_h=n(0.20, 0.03, 0.12, 0.28), right_dome_up=n(0.04, 0.015, 0.0, 0.08),
        medi_hw=n(0.14, 0.015, 0.11, 0.18), ctr=n(0.44, 0.025, 0.38, 0.49),
        heart_ry=n(0.23, 0.02, 0.18, 0.28), heart_tilt=n(0.35, 0.08, 0.15, 0.55),
        hilum_y=n(-0.12, 0.03, -0.2, -0.04),
        rib_y0=n(-0.93, 0.03, -1.0, -0.85), rib_gap=n(0.105, 0.008, 0.09, 0.12),
        rib_gap_growth=n(0.004, 0.001, 0.002, 0.006), rib_rise=n(0.45, 0.06, 0.3, 0.6),
        rib_curve=n(0.9, 0.1, 0.65, 1.15),
        bone=n(1.0 - 0.004 * max(0, age - 40), 0.08, 0.55, 1.2),
        soft=n(0.86, 0.09, 0.65, 1.1), body_hw=thorax_hw + n(0.26, 0.06, 0.18, 0.42),   # chest wall + arms
        breast=n(0.10, 0.04, 0.0, 0.2) if female else 0.0,
        textures=tex,
    )


def sample_pose(rng: np.random.Generator, view: str) -> Pose:
    ap = view == "AP"
    return Pose(
        rotation_deg=float(rng.normal(0, 2.0 if ap else 1.2)), scale=float(rng.uniform(0.93, 1.05)),
        shift_x=float(rng.normal(0, 0.03)), shift_y=float(rng.normal(0.02 if ap else 0, 0.04)),
        inspiration=float(rng.normal(-0.04 if ap else 0.02, 0.04)),
        exposure=float(rng.uniform(1.8, 3.4)), level=float(rng.uniform(0.48, 0.64)), gamma=float(rng.uniform(0.7, 1.4)),
        window_lo=float(rng.uniform(0.0, 0.12)), window_hi=float(rng.uniform(0.85, 1.0)),
        noise=float(rng.uniform(0.006, 0.022 if ap else 0.016)), blur_px=float(rng.uniform(0.3, 1.0)),
        sharpen=float(rng.uniform(20, 90)), heel=float(rng.normal(0, 0.05)), marker=bool(rng.random() < 0.8),
    )


class Frame:
    """Pixel grid <-> anatomical coordinates for one image under one pose."""

    def __init__(self, height_px: int, width_px: int, pose: Pose):
        self.h, self.w = height_px, width_px
        half = width_px / 2.0
        c, s = math.cos(math.radians(pose.rotation_deg)), math.sin(math.radians(pose.rotation_deg))
        # output pixel (j, i) -> normalised (xn, yn) -> anatomical (x, y) = R^-1 (xn, yn) / scale - shift
        lin = np.array([[c, s], [-s, c]]) / pose.scale / half
        off = lin @ np.array([-width_px / 2.0 + 0.5, -height_px / 2.0 + 0.5]) - np.array([pose.shift_x, pose.shift_y])
        self.affine = np.concatenate([lin, off[:, None]], axis=1)        # (2, 3)
        jj = np.arange(width_px, dtype=np.float32)[None, :]
        ii = np.arange(height_px, dtype=np.float32)[:, None]
        a = self.affine.astype(np.float32)
        self.x = a[0, 0] * jj + a[0, 1] * ii + a[0, 2]                   # (H, W)
        self.y = a[1, 0] * jj + a[1, 1] * ii + a[1, 2]                   # (H, W)
        self.unit_px = pose.scale * half                                  # pixels per anatomical unit

    def to_px(self, pts) -> list[tuple[float, float]]:
        """Anatomical points -> pixel coordinates (for drawing devices and markers)."""
        m = np.vstack([self.affine, [0, 0, 1]])
        inv = np.linalg.inv(m)
        p = np.asarray(pts, dtype=np.float64)
        q = p @ inv[:2, :2].T + inv[:2, 2]
        return [(float(a), float(b)) for a, b in q]

    def bbox(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Pixel slices (rows, cols) covering an anatomical rectangle: organs are rendered only where they can be."""
        pts = np.asarray(self.to_px([(x0, y0), (x0, y1), (x1, y0), (x1, y1)]))
        j0, i0 = np.floor(pts.min(axis=0)).astype(int) - 1
        j1, i1 = np.ceil(pts.max(axis=0)).astype(int) + 2
        return slice(max(i0, 0), max(min(i1, self.h), 0)), slice(max(j0, 0), max(min(j1, self.w), 0))

    def texture(self, field_: np.ndarray) -> np.ndarray:
        """Warp a small anatomical-frame noise field onto this grid (bilinear, in C)."""
        n = field_.shape[0]
        k = n / (2 * TEXTURE_EXTENT)  # field pixels per anatomical unit
        a = self.affine
        coeffs = (a[0, 0] * k, a[0, 1] * k, (a[0, 2] + TEXTURE_EXTENT) * k - 0.5,
                  a[1, 0] * k, a[1, 1] * k, (a[1, 2] + TEXTURE_EXTENT) * k - 0.5)
        img = Image.fromarray(field_, mode="F").transform((self.w, self.h), Image.Transform.AFFINE, coeffs,
                                                          resample=Image.Resampling.BILINEAR)
        return np.asarray(img)
