"""Lateral phantom (anterior on image left): superimposed lungs, heart, spine, sternum and the visible findings."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from synth.phantom import Anatomy, Findings, Frame, Pose, ramp

EDGE = 0.015


def _lateral_devices(find: Findings, anat: Anatomy, frame: Frame) -> np.ndarray:
    layer = Image.new("L", (frame.w, frame.h), 0)  # 255 = attenuation 1.0
    draw = ImageDraw.Draw(layer)
    px = max(2, int(round(frame.unit_px * 0.01)))
    if "ett" in find.devices:
        draw.line(frame.to_px([(-0.05, -1.5), (0.0, -0.6), (0.04, anat.hilum_y - 0.2)]), fill=90, width=px)
    if "ngt" in find.devices:
        draw.line(frame.to_px([(0.05, -1.5), (0.2, -0.3), (0.15, anat.base_y + 0.1), (-0.1, anat.base_y + 0.3)]),
                  fill=80, width=px, joint="curve")
    if "pacer" in find.devices:
        (x0, y0), (x1, y1) = frame.to_px([(-0.8, -0.75), (-0.66, -0.67)])
        draw.rounded_rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], radius=2, fill=230)
        draw.line(frame.to_px([(-0.7, -0.7), (-0.2, -0.5), (-0.15, 0.0), (-0.45, anat.base_y - 0.05)]), fill=128,
                  width=px + 1, joint="curve")
    if "cvc" in find.devices:
        draw.line(frame.to_px([(-0.3, -1.0), (-0.1, -0.55), (-0.05, anat.hilum_y)]), fill=100, width=px)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32) * (1.0 / 255.0)


def lateral_attenuation(anat: Anatomy, find: Findings, pose: Pose, frame: Frame) -> np.ndarray:
    x, y = frame.x, frame.y
    fine = frame.texture(anat.textures[2])
    mid = frame.texture(anat.textures[1])
    # the body is thickest side-to-side: a lateral film is denser and flatter than a frontal one
    neck = ramp(y - (anat.apex_y - 0.15), 0.3)
    front = -0.35 - 0.45 * neck
    back = 0.5 + 0.35 * neck
    mid_x = (front + back) / 2
    body = np.sqrt(np.clip(1.0 - ((x - mid_x) / ((back - front) / 2 + 0.05)) ** 2, 0.0, 1.0))
    mu = anat.soft * 1.05 * body * (0.95 + 0.03 * mid)
    # raised arms over the upper chest
    mu += (0.12 * ramp(0.16 - np.abs((x + 0.1) * 0.6 + (y - (anat.apex_y - 0.05))), 0.08)
           * ramp(anat.apex_y + 0.3 - y, 0.1))

    height = anat.base_y + pose.inspiration + 0.05 - anat.apex_y
    v = (y - anat.apex_y) / height
    vc = np.clip(v, 0, 1)
    ant = -0.12 - 0.52 * np.sqrt(vc)
    post = 0.15 + 0.5 * np.sqrt(vc)
    u = (x - ant) / (post - ant)
    uc = np.clip(u, 0, 1)
    v_bottom = 0.86 + 0.14 * uc ** 2 - 0.1 * np.clip(np.sin(np.pi * uc), 0, 1)   # posterior sulcus is the deepest
    dist = np.minimum(np.minimum(x - ant, post - x), np.minimum(v - 0.2 * (2 * uc - 1) ** 2, v_bottom - v) * height)
    lung = ramp(dist, EDGE)

    ctr_gain = find.cardiomegaly / 0.44
    rx, ry = 0.27 * (1 + 0.9 * ctr_gain), 0.25 * (1 + 0.3 * ctr_gain)
    hx, hy = -0.3 + 0.1 * ctr_gain, anat.apex_y + 0.75 * height
    heart = ramp((1 - np.sqrt(((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2)) * min(rx, ry), EDGE)
    aorta = np.exp(-((np.sqrt((x - 0.02) ** 2 + ((y - (anat.hilum_y - 0.15)) * 1.3) ** 2) - 0.2) / 0.035) ** 2)
    aorta *= ramp(anat.hilum_y - 0.1 - y, 0.1) + ramp(x - 0.18, 0.05)
    lung = lung * (1 - 0.8 * heart)

    opacity = np.zeros_like(x)
    if find.effusion:
        h = max(find.effusion.values())
        fluid = ramp((v - (1.0 - h * 0.8 - (0.05 + 0.35 * h) * uc ** 2)) * height, 0.04)
        opacity = np.maximum(opacity, 0.95 * fluid)
    for _, cu, cv, cr in find.consolidation:
        d2 = ((u - (0.3 + 0.4 * cu)) * (post - ant)) ** 2 + ((v - cv) * height) ** 2
        opacity = np.maximum(opacity, 0.7 * np.clip((np.exp(-d2 / (cr * cr)) * 1.3 + 0.45 * fine - 0.6) * 2.5, 0, 1))
    for _, lu, lv, lr in find.lesion:
        d = np.sqrt(((u - lu) * (post - ant)) ** 2 + ((v - lv) * height) ** 2)
        opacity = np.maximum(opacity, 0.8 * np.sqrt(np.clip(1 - (d / lr) ** 2, 0, 1)))
    if find.edema > 0:
        opacity = np.maximum(opacity, find.edema * 0.6 * np.exp(-((x - 0.05) ** 2 + (y - anat.hilum_y) ** 2) / 0.15))
    mu -= 0.45 * anat.soft * lung * (1 - opacity) * (0.7 + 0.3 * np.sqrt(np.clip(4 * u * (1 - u), 0, 1)))
    hil_d2 = (x - 0.05) ** 2 + (y - anat.hilum_y) ** 2
    mu += (0.12 * np.exp(-hil_d2 / 0.02) + 0.04 * np.exp(-(fine / 0.15) ** 2) * np.exp(-hil_d2 / 0.2)) * lung
    mu += 0.03 * heart + 0.03 * aorta

    trachea_x = 0.0 + 0.08 * (y - anat.apex_y)
    mu -= 0.07 * ramp(0.04 - np.abs(x - trachea_x), 0.015) * ramp(anat.hilum_y - 0.15 - y, 0.04)
    # thoracic spine: vertebral bodies with disc spaces, following a gentle kyphosis
    spine_x = 0.56 + 0.06 * (y - 0.0) ** 2 - 0.04 * y
    in_column = ramp(0.09 - np.abs(x - spine_x), 0.012)
    disc = np.exp(-(((y * 8.5 + 0.2) % 1.0 - 0.5) / 0.08) ** 2)
    mu += anat.bone * in_column * (0.09 - 0.05 * disc)
    mu += 0.05 * anat.bone * ramp(0.05 - np.abs(x - (spine_x + 0.16)), 0.02) * (1 - disc)   # posterior elements
    sternum = (ramp(0.03 - np.abs(x - (ant - 0.07)), 0.01) * ramp(y - (anat.apex_y + 0.2), 0.02)
               * ramp(hy + 0.1 - y, 0.05))
    mu += 0.1 * anat.bone * sternum
    ribs = np.exp(-((((y - 0.35 * x) / anat.rib_gap) % 1.0 - 0.5) / 0.15) ** 2) * ramp(x - 0.2, 0.1) * lung
    mu += 0.04 * anat.bone * ribs
    if find.devices:
        mu += _lateral_devices(find, anat, frame)
    return np.maximum(mu, 0.0).astype(np.float32)
