"""A labelled picture grid (PNG) of a few films, for the README, the demo report and for eyeballing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_preview(images: list[np.ndarray], captions: list[str], path: str | Path, columns: int = 4,
                 tile_px: int = 256) -> Path:
    """A labelled picture grid (PNG) of a few images, for the README, the report and for eyeballing.

    Each image is scaled to the tile width (small renders are enlarged, so no empty band is left under them) and
    sits on the bottom of its cell, its caption directly beneath it on a gray band: caption and film touch."""
    from PIL import ImageDraw, ImageFont
    rows = (len(images) + columns - 1) // columns
    gap, caption_px = 6, max(12, tile_px // 16)
    tiles = []
    for img in images:
        tile = Image.fromarray(img, mode="L")
        scale = tile_px / tile.width
        tiles.append(tile.resize((tile_px, max(1, round(tile.height * scale))), Image.Resampling.BILINEAR))
    film_h = max((t.height for t in tiles), default=tile_px)
    band_h = 2 * (caption_px + 3) + 4  # two caption lines
    cell_w, cell_h = tile_px + gap, film_h + band_h + gap
    grid = Image.new("L", (columns * cell_w + gap, rows * cell_h + gap), 255)  # white gutters between cells
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=caption_px)
    for i, (tile, cap) in enumerate(zip(tiles, captions)):
        x0, y0 = gap + (i % columns) * cell_w, gap + (i // columns) * cell_h
        film_top = y0 + film_h - tile.height
        grid.paste(tile, (x0, film_top))
        draw.rectangle((x0, y0 + film_h, x0 + tile_px - 1, y0 + film_h + band_h - 1), fill=48)
        for line_no, line in enumerate(_wrap(cap, font, tile_px - 6, lines=2)):
            draw.text((x0 + 3, y0 + film_h + 2 + line_no * (caption_px + 3)), line, fill=255, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _wrap(text: str, font, width_px: float, lines: int) -> list[str]:
    """Greedy word wrap to ``width_px``; the last line ends in an ellipsis when the text does not fit."""
    out, words = [], text.split(" ")
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width_px:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words:
        while out[-1] and font.getlength(out[-1] + "…") > width_px:
            out[-1] = out[-1][:-1]
        out[-1] += "…"
    return out
