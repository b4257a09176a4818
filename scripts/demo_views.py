"""Save one pretraining batch as a picture: each row pairs the two augmented views the model is asked to match.

python scripts/demo_views.py CONFIG.toml OUT.png [section.key=value ...]   (the same config and overrides as the run)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainer.augment_section import augment_config
from trainer.config import ConfigError, load_config, split_argv
from trainer.data import build_loader


def views_grid(cfg, out: Path, pairs: int = 8, tile_px: int = 96) -> Path:
    loader = build_loader(cfg.data, cfg.model, cfg.loss, augment=augment_config(cfg.augment),
                          per_rank_batch=max(pairs, 2), rank=0, world_size=1, seed=cfg.run.seed,
                          device=torch.device("cpu"), dtype=torch.float32)
    batch = next(iter(loader))
    v1, v2 = batch["view1"][:pairs].float(), batch["view2"][:pairs].float()   # (P, C, S, S) normalised
    grid = Image.new("L", (pairs * tile_px, 2 * tile_px + 24), 0)
    draw = ImageDraw.Draw(grid)
    for i in range(min(pairs, v1.shape[0])):
        for row, v in enumerate((v1[i], v2[i])):
            a = v[0].numpy()
            # per-view stretch: show the content, not the scale
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
            tile = Image.fromarray((a * 255).astype(np.uint8)).resize((tile_px, tile_px), Image.Resampling.BILINEAR)
            grid.paste(tile, (i * tile_px, row * tile_px))
    draw.text((4, 2 * tile_px + 4), f"top/bottom: the two augmented views of one image ({cfg.augment.preset}, "
                                   f"{cfg.data.image_size} px, as the encoder sees them)", fill=255)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    config, out, overrides = argv[0], Path(argv[1]), argv[2:]
    try:
        cfg = load_config(*split_argv([config, *overrides]))
    except ConfigError as e:
        print(f"demo_views: {e}", file=sys.stderr)
        return 2
    print(views_grid(cfg, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
