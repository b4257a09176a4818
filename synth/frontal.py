"""Frontal (PA / AP) phantom: body, lungs, mediastinum, heart, bones, vessels and findings as one attenuation map."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from synth.phantom import SIDES, Anatomy, Findings, Frame, Pose, ramp

EDGE = 0.012          # soft-edge width of organ borders, anatomical units
LUNG_AIR = 0.52       # attenuation removed where a full-thickness lung replaces soft tissue


def lung_geometry(anat: Anatomy, find: Findings, pose: Pose, view: str, x, y, side: int):
    """Per side: lung mask, local coordinates (u: medial 0 -> lateral 1, v: apex 0 -> base 1) and helpers."""
    ax = side * x
    height = anat.base_y + pose.inspiration - anat.apex_y
    v = (y - anat.apex_y) * (1.0 / height)
    vc = np.clip(v, 0.0, 1.0)
    lateral = anat.thorax_hw * (1.0 - 0.5 * (1.0 - vc) ** 3)
    medial = anat.medi_hw + find.enlarged_mediastinum * (1.0 - vc) + 0.03 * vc
    u = (ax - medial) / (lateral - medial)
    dome_h = anat.dome_h + (anat.right_dome_up if side < 0 else 0.0)
    for a_side, _, _ in find.atelectasis:
        dome_h += 0.05 if a_side == side else 0.0     # volume loss lifts the hemidiaphragm
    uc = np.clip(u, 0.0, 1.0)
    peak = 0.42
    dome = np.where(uc > peak, 1.0 - ((uc - peak) / (1 - peak)) ** 2, 1.0 - 0.5 * ((peak - uc) / peak) ** 2)
    v_bottom = 1.0 - dome_h * dome
    v_top = 0.16 * (2.0 * uc - 0.9) ** 2
    dist = np.minimum(np.minimum(ax - medial, lateral - ax), np.minimum((v - v_top), (v_bottom - v)) * height)
    mask = ramp(dist, EDGE)
    return {"mask": mask, "u": u, "v": v, "ax": ax, "lateral": lateral, "medial": medial, "height": height,
            "v_bottom": v_bottom, "v_top": v_top}


def _ribs(anat: Anatomy, find: Findings, x, y, lat_limit, side: int, ax):
    """Posterior ribs (curved bands from the spine) and fainter anterior ribs, with an optional fracture."""
    yp = y + anat.rib_rise * ax - anat.rib_curve * ax * ax
    g, g2 = anat.rib_gap, anat.rib_gap_growth
    k = (-g + np.sqrt(np.maximum(g * g - 4 * g2 * (anat.rib_y0 - yp), 0.0))) / (2 * g2)   # rib index as a phase
    if find.fracture is not None and find.fracture[0] == side:
        _, rib, pos = find.fracture
        near = np.abs(k - rib) < 0.6
        k = k + np.where(near & (ax > pos), 0.12, 0.0)          # displaced fragment
        gap = np.where(near, np.exp(-((ax - pos) / 0.012) ** 2), 0.0)
    else:
        gap = 0.0
    frac = k - np.round(k)
    band = np.exp(-(frac / 0.2) ** 2) + 0.35 * np.exp(-((np.abs(frac) - 0.2) / 0.04) ** 2)  # body + cortex
    region = ramp(lat_limit + 0.03 - ax, 0.02) * ramp(ax - 0.07, 0.03) * ramp(k + 0.5, 0.3) * ramp(10.6 - k, 0.3)
    post = band * region * (1.0 - gap)
    ya = y - 0.55 * (lat_limit - ax) + 0.25 * (lat_limit - ax) ** 2
    ka = (ya - anat.rib_y0 - 0.25) / (anat.rib_gap * 1.45)
    fa = ka - np.round(ka)
    ant = (np.exp(-(fa / 0.16) ** 2) * ramp(ax - 0.3, 0.08) * ramp(lat_limit - ax, 0.03) * ramp(ka + 0.3, 0.3)
           * ramp(6.5 - ka, 0.5))
    return post, ant


def _devices(find: Findings, anat: Anatomy, frame: Frame, heart_xy, heart_r) -> np.ndarray:
    """Tubes, lines, pacemaker and ECG leads drawn at the output resolution (thin, sharp, very dense)."""
    layer = Image.new("L", (frame.w, frame.h), 0)  # 255 = attenuation 1.0
    draw = ImageDraw.Draw(layer)
    rng = np.random.default_rng(find.device_seed)
    px = max(2, int(round(frame.unit_px * 0.01)))
    carina_y = anat.hilum_y - 0.18
    if "ett" in find.devices:
        tip = carina_y - rng.uniform(0.08, 0.2)
        for dx in (-0.018, 0.018):
            draw.line(frame.to_px([(dx, -1.5), (dx * 0.9, tip)]), fill=89, width=px)
        draw.line(frame.to_px([(0.0, -1.5), (0.0, tip)]), fill=64, width=px)
    if "ngt" in find.devices:
        pts = [(0.01, -1.5), (0.03, anat.hilum_y), (0.08, anat.base_y), (0.35, anat.base_y + 0.2),
               (0.45, anat.base_y + 0.32)]
        draw.line(frame.to_px(pts), fill=76, width=px)
    if "cvc" in find.devices:
        s = -1 if rng.random() < 0.7 else 1
        pts = [(s * 0.95, -0.85), (s * 0.55, -0.72), (s * 0.2, -0.62), (-0.06, -0.45), (-0.07, anat.hilum_y)]
        draw.line(frame.to_px(pts), fill=102, width=px, joint="curve")
    if "pacer" in find.devices:
        s = 1 if rng.random() < 0.8 else -1
        cx, cy = s * rng.uniform(0.45, 0.6), rng.uniform(-0.78, -0.62)
        box = frame.to_px([(cx - 0.09, cy - 0.06), (cx + 0.09, cy + 0.06)])
        (x0, y0), (x1, y1) = box
        draw.rounded_rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)],
                               radius=max(1, int(abs(x1 - x0) / 4)), fill=230)
        hx, hy = heart_xy
        pts = [(cx, cy), (cx * 0.5, cy + 0.05), (-0.02, -0.45), (-0.05, hy - 0.1), (hx + 0.3 * heart_r, hy + 0.1)]
        draw.line(frame.to_px(pts), fill=128, width=px + 1, joint="curve")
    if "ecg" in find.devices:
        for _ in range(int(rng.integers(2, 6))):
            cx, cy = rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.6)
            (a, b), (c, d) = frame.to_px([(cx - 0.025, cy - 0.025), (cx + 0.025, cy + 0.025)])
            draw.ellipse([min(a, c), min(b, d), max(a, c), max(b, d)], outline=153, width=px + 1)
            end = (cx + rng.uniform(-0.6, 0.6), cy + rng.uniform(-0.6, 0.2))
            draw.line(frame.to_px([(cx, cy), ((cx + end[0]) / 2 + 0.1, (cy + end[1]) / 2), end]), fill=51, width=px)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32) * (1.0 / 255.0)


def _vessels(field_: np.ndarray, dx, dy, d2) -> np.ndarray:
    """Vascular markings: ridges of a noise field sampled in polar coordinates about the hilum, so they radiate,
    branch and taper towards the periphery like pulmonary vessels."""
    n_theta, n_r = field_.shape
    a = (np.arctan2(dy, np.abs(dx) + 1e-3) * (n_theta / np.pi) + n_theta / 2.0) % (n_theta - 1)
    b = np.clip(np.sqrt(np.sqrt(d2)) * (n_r * 0.35), 0, n_r - 2)
    i0, j0 = a.astype(np.int32), b.astype(np.int32)
    fa, fb = a - i0, b - j0
    val = ((field_[i0, j0] * (1 - fb) + field_[i0, j0 + 1] * fb) * (1 - fa)
           + (field_[i0 + 1, j0] * (1 - fb) + field_[i0 + 1, j0 + 1] * fb) * fa)
    caliber = 0.25 * np.exp(-d2 / 0.5) + 0.06
    return np.exp(-(val / caliber) ** 2)


def frontal_attenuation(anat: Anatomy, find: Findings, pose: Pose, view: str, frame: Frame) -> np.ndarray:
    x, y = frame.x, frame.y
    ap = view == "AP"
    fine, mid = frame.texture(anat.textures[2]), frame.texture(anat.textures[1])
    # body: a soft-tissue cylinder with neck and shoulders
    shoulder = ramp(y - (anat.apex_y - 0.2), 0.25)
    body_hw = 0.32 + (anat.body_hw - 0.32) * shoulder
    body = np.clip(1.0 - (x / body_hw) ** 2, 0.0, 1.0) ** 0.3   # flatter than a cylinder: chest wall stays bright
    mu = anat.soft * body * (0.92 + 0.04 * mid)
    mu += 0.1 * body * ramp(np.abs(x) - anat.thorax_hw, 0.08)   # chest-wall muscles seen tangentially
    if anat.breast > 0:
        for s in SIDES:
            d2 = ((x - s * 0.52) / 0.36) ** 2 + ((y - (anat.base_y - 0.12)) / 0.26) ** 2
            mu += anat.breast * np.clip(1.0 - d2, 0.0, 1.0) ** 0.6

    # heart silhouette: sized from the cardiothoracic ratio; AP projection magnifies it
    ctr = anat.ctr + find.cardiomegaly
    heart_w = ctr * 2 * anat.thorax_hw * (1.06 if ap else 1.0)
    t = anat.heart_tilt
    ry = anat.heart_ry * (1.0 + 0.6 * find.cardiomegaly)
    rx = np.sqrt(max((heart_w / 2) ** 2 - (ry * np.sin(t)) ** 2, 0.01)) / np.cos(t)
    hx = heart_w / 6.0
    hy = anat.base_y + pose.inspiration - 0.2 * (anat.base_y - anat.apex_y) - 0.55 * ry
    xr, yr = x - hx, y - hy
    xt, yt = np.cos(t) * xr + np.sin(t) * yr, -np.sin(t) * xr + np.cos(t) * yr
    heart = ramp((1.0 - np.sqrt((xt / rx) ** 2 + (yt / ry) ** 2)) * min(rx, ry), EDGE)
    knob = ramp(0.065 - np.sqrt((x - (anat.medi_hw * 0.9)) ** 2 + (y - (anat.hilum_y - 0.3)) ** 2), EDGE)
    cardiac = np.maximum(heart, knob)
    mu += 0.03 * cardiac

    lung_total = np.zeros_like(x)
    markings = np.zeros_like(x)
    full_mu = mu
    for s in SIDES:
        lo, hi = sorted((s * (anat.thorax_hw + 0.05), s * (anat.medi_hw - 0.05)))
        sl = frame.bbox(lo, hi, anat.apex_y - 0.05, anat.base_y + pose.inspiration + 0.05)
        # views: in-place edits land
        x, y, fine_s, mid_s, mu = frame.x[sl], frame.y[sl], fine[sl], mid[sl], full_mu[sl]
        g = lung_geometry(anat, find, pose, view, x, y, s)
        lung, u, v, ax = g["mask"], g["u"], g["v"], g["ax"]
        lung = lung * (1.0 - 0.75 * cardiac[sl])
        thick = (0.6 + 0.4 * np.sqrt(np.clip(4 * u * (1 - u), 0, 1))) * (0.75 + 0.25 * np.clip(v * 1.6, 0, 1))
        air = LUNG_AIR * anat.soft * thick
        hil_y = anat.hilum_y + (0.03 if s < 0 else 0.0)
        hil_d2 = (ax - g["medial"] - 0.02) ** 2 + (y - hil_y) ** 2
        hilar = np.exp(-hil_d2 / 0.16)
        mark = _vessels(anat.textures[3], ax - g["medial"] - 0.02, y - hil_y, hil_d2) * (0.3 + 0.7 * hilar)
        mark += 0.8 * np.exp(-hil_d2 / 0.006)
        opacity = np.zeros_like(x)
        if s in find.effusion:
            h = find.effusion[s]
            meniscus = (0.08 + 0.4 * h) * np.clip(u, 0, 1) ** 2
            fluid = ramp((v - (1.0 - h - meniscus)) * g["height"], 0.05) * ramp(u * 4, 0.5)
            if ap:   # supine: fluid layers posteriorly, a veil over the hemithorax
                fluid = np.maximum(fluid, 0.35 * h * 2 * ramp(v - 0.2, 0.4) * ramp(u * 4, 0.5))
            opacity = np.maximum(opacity, 0.95 * fluid)
        for c_side, cu, cv, cr in find.consolidation:
            if c_side == s:
                d2 = ((u - cu) * (g["lateral"] - g["medial"])) ** 2 + ((v - cv) * g["height"]) ** 2
                # fluffy margins
                patch = np.clip(np.exp(-d2 / (cr * cr)) * 1.3 + 0.35 * fine_s + 0.15 * mid_s - 0.3, 0, 1)
                opacity = np.maximum(opacity, 0.9 * patch)
        if find.edema > 0:
            bat = np.exp(-hil_d2 / (0.1 + 0.1 * find.edema)) * (0.75 + 0.25 * mid_s)
            kerley = np.exp(-((((y * 28.0) % 1.0) - 0.5) / 0.08) ** 2) * ramp(u - 0.8, 0.1) * ramp(v - 0.6, 0.1)
            opacity = np.maximum(opacity, find.edema * (0.9 * bat + 0.3 * kerley * (fine_s > 0)))
            mark = mark * (1.0 + find.edema)   # engorged, indistinct vessels
        for a_side, av, tilt in find.atelectasis:
            if a_side == s:
                dist = (v - av - tilt * (u - 0.5)) * g["height"]
                opacity = np.maximum(opacity,
                                     0.9 * np.exp(-(dist / 0.03) ** 2) * ramp(u - 0.1, 0.1) * ramp(0.95 - u, 0.1))
        for l_side, lu, lv, lr in find.lesion:
            if l_side == s:
                d = np.sqrt(((u - lu) * (g["lateral"] - g["medial"])) ** 2 + ((v - lv) * g["height"]) ** 2)
                opacity = np.maximum(opacity,
                                     0.9 * np.sqrt(np.clip(1 - (d / lr) ** 2, 0, 1)) + 0.1 * ramp(lr - d, 0.01))
        if find.pleural_other == s:
            rim = ramp(0.03 - (g["lateral"] - ax), 0.01) * ramp(v - 0.3, 0.2)
            opacity = np.maximum(opacity, 0.6 * rim)
        if find.pneumothorax is not None and find.pneumothorax[0] == s:
            rim_w = find.pneumothorax[1] * (g["lateral"] - g["medial"]) * (1.0 - 0.55 * np.clip(v, 0, 1))
            edge_d = np.minimum(g["lateral"] - ax, (v - g["v_top"]) * g["height"] * 1.3)
            ptx = ramp(rim_w - edge_d, 0.006) * (lung > 0.01)
            mark = mark * (1.0 - ptx)
            pleural_line = np.exp(-((edge_d - rim_w) / 0.006) ** 2) * lung
            mu -= 0.07 * ptx * lung - 0.06 * pleural_line
            air = air * (1.0 + 0.1 * ptx) - 0.12 * (1.0 - ptx) * air   # the collapsed lung is denser
        mu -= air * lung * (1.0 - opacity)
        markings[sl] += 0.09 * mark * lung * (1.0 - opacity)
        lung_total[sl] += lung
    x, y, mu = frame.x, frame.y, full_mu
    mu += markings

    # mediastinum: trachea (air column) and spine through it
    trachea = ramp(0.042 - np.abs(x - 0.015 * (y + 1)), 0.015) * ramp(anat.hilum_y - 0.2 - y, 0.03)
    mu -= 0.14 * trachea
    column = ramp(0.075 - np.abs(x), 0.02)
    disc = np.exp(-(((y * 9.5 + 0.3) % 1.0 - 0.5) / 0.09) ** 2)
    mu += anat.bone * column * (0.06 - 0.03 * disc)
    pedicles = np.exp(-(((np.abs(x) - 0.055) / 0.012) ** 2 + (((y * 9.5 + 0.3) % 1.0 - 0.25) / 0.1) ** 2))
    mu += 0.03 * anat.bone * pedicles

    # gastric bubble under the left hemidiaphragm
    stomach_y = anat.base_y + pose.inspiration + 0.05
    mu -= 0.18 * ramp(1.0 - ((x - 0.42) / 0.12) ** 2 - ((y - stomach_y) / 0.06) ** 2, 0.3) * (y < stomach_y + 0.02)

    # bones: ribs, clavicles, scapulae, humeral heads
    for s in SIDES:
        ax = s * x
        height = anat.base_y - anat.apex_y
        vc = np.clip((y - anat.apex_y) / height, 0.0, 1.2)
        cage = anat.thorax_hw * (1.0 - 0.5 * np.clip(1.0 - vc, 0, 1) ** 3) + 0.02
        post, ant = _ribs(anat, find, x, y, cage, s, ax)
        mu += anat.bone * (0.09 * post + 0.045 * ant) * (0.35 + 0.65 * lung_total)
        tc = np.clip((ax - 0.05) / 0.7, 0.0, 1.0)
        clav_y = anat.apex_y + 0.16 - 0.2 * tc + 0.04 * np.sin(2 * np.pi * tc)
        clav = (ramp(0.028 + 0.012 * (1 - tc) - np.abs(y - clav_y), 0.012) * ramp(ax - 0.07, 0.02)
                * ramp(0.8 - ax, 0.05))
        mu += 0.13 * anat.bone * clav
        hd = np.sqrt((ax - (anat.thorax_hw + 0.24)) ** 2 + (y - (anat.apex_y + 0.02)) ** 2)
        mu += 0.25 * anat.bone * np.sqrt(np.clip(1 - (hd / 0.17) ** 2, 0, 1))
        scap_x = 0.55 + 0.25 * np.clip((y - anat.apex_y) / 0.6, 0, 1) + (0.0 if ap else 0.18)
        mu += 0.05 * anat.bone * ramp(ax - scap_x, 0.02) * ramp(anat.apex_y + 0.6 - y, 0.1) * ramp(1.05 - ax, 0.05)

    if find.devices:
        mu += _devices(find, anat, frame, (hx, hy), rx)
    return np.maximum(mu, 0.0).astype(np.float32)
