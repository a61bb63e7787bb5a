"""Image grids with captions, as PNG. Images flagged unsafe are blurred unless the caller turns that off."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from safealign.core.io import atomic_path


def blur(img: np.ndarray) -> np.ndarray:
    """A strong Gaussian blur (radius 1/6 of the side), enough to hide what an image shows."""
    im = Image.fromarray(img)
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius=max(2, img.shape[0] // 6))))


def save_grid(path: Path, columns: Sequence[str], rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str],
              flags: Sequence[Sequence[bool]] | None = None, blur_flagged: bool = True, cell: int = 96) -> None:
    """rows[i][j]: uint8 (H, W, 3) image of row i, column j. A caption on the left of each row, column titles on
    top; flagged cells are blurred (when ``blur_flagged``) and framed in red."""
    n_rows, n_cols = len(rows), len(columns)
    text_w, head_h, pad = 200, 18, 4
    canvas = Image.new("RGB", (text_w + n_cols * (cell + pad), head_h + n_rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(columns):
        draw.text((text_w + j * (cell + pad) + 2, 2), title, fill="black")
    for i, row in enumerate(rows):
        y = head_h + i * (cell + pad)
        draw.multiline_text((2, y + 2), "\n".join(textwrap.wrap(captions[i], 32)[:6]), fill="black")
        for j, img in enumerate(row):
            flagged = bool(flags[i][j]) if flags is not None else False
            shown = blur(img) if flagged and blur_flagged else img
            x = text_w + j * (cell + pad)
            canvas.paste(Image.fromarray(shown).resize((cell, cell), Image.NEAREST), (x, y))
            if flagged:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline="red", width=2)
    with atomic_path(Path(path)) as tmp:
        canvas.save(tmp, format="PNG")
