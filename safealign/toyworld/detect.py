"""The toy world's exact pixel detectors: read every attribute of an image back from its pixels.

Robust to the speckle of generated images (median filter, opening, largest connected component); >= 0.99
accurate on drawn images. Images are (H, W, 3) float in [0, 1] or uint8.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from safealign.toyworld.world import BACKGROUNDS, COLORS, SHAPES, SIZES, _shape_mask


def _denoise(img: np.ndarray) -> np.ndarray:
    """3x3 median filter per channel: generated pixels carry speckle, drawn ones do not."""
    return ndimage.median_filter(img, size=(3, 3, 1), mode="nearest")


def _object_mask(dist: np.ndarray) -> np.ndarray:
    """Pixels far from the background, opened (drops specks), largest connected component, holes filled."""
    mask = ndimage.binary_opening(dist > 0.35)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[float, float, float]]) -> tuple[str, float]:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[k] for k in names]) - rgb[None], axis=1)
    i = int(np.argmin(d))
    return names[i], float(d[i])


def detect(img: np.ndarray) -> dict[str, str]:
    """Read every attribute of one image (H, W, 3) in [0, 1]. Returns {'color','shape','size','background'};
    a value is 'none' where no object is found."""
    img = _denoise(np.clip(img.astype(np.float32), 0, 1))
    h, w = img.shape[:2]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background, _ = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.linalg.norm(img - bg_rgb[None, None], axis=-1)
    mask = _object_mask(dist)
    out = {"background": background, "color": "none", "shape": "none", "size": "none"}
    if mask.sum() < 6:
        return out
    core = mask & (dist > 0.6 * dist[mask].max())
    out["color"] = _nearest(np.median(img[core], axis=0), COLORS)[0]
    ys, xs = np.nonzero(mask)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    half = extent / 2
    out["size"] = "large" if half > (SIZES["small"] + SIZES["large"]) / 2 * h else "small"
    cy, cx = (ys.max() + ys.min() + 1) / 2, (xs.max() + xs.min() + 1) / 2
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    best, best_iou = "none", -1.0
    for shape in SHAPES:
        t = _shape_mask(shape, xx, yy, cx, cy, half)
        iou = (t & mask).sum() / max(1, (t | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    out["shape"] = best
    return out


def detect_batch(images: np.ndarray) -> list[dict[str, str]]:
    """images: (N, H, W, 3) float in [0, 1] or uint8."""
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    return [detect(im) for im in images]
