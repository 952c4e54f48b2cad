"""Image decoding shared by ingest (inspection), preprocess (arrays) and prediction.

One place decides how a file on disk becomes RGB pixels, so training and serving see
the same pixels (no train/serve skew).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Extensions graft treats as images; anything else in a class folder is ignored (and counted).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ImageInfo:
    width: int | None
    height: int | None
    mode: str | None
    error: str | None  # None when the image decodes fully


def inspect(data: bytes) -> ImageInfo:
    """Fully decode ``data`` (not just the header) and report its size and mode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # forces the whole decode: a truncated file fails here
            return ImageInfo(im.width, im.height, im.mode, None)
    except Exception as e:  # PIL raises many types for bad data; all mean "cannot decode"
        message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # not the file's name
        return ImageInfo(None, None, None, f"{type(e).__name__}: {message}")


def to_rgb(im: Image.Image) -> Image.Image:
    """An upright image (EXIF rotation applied: ``ImageOps.exif_transpose``) of any PIL
    mode to RGB: transparency composited on white, 16-bit and float images rescaled
    rather than clipped."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def resize(im: Image.Image, size: int, interpolation: str, mode: str) -> Image.Image:
    """``center_crop``: the largest central square, resized to ``size`` (keeps the aspect
    ratio, as timm's eval transform does); ``squash``: straight to size x size."""
    resample = INTERPOLATIONS[interpolation]
    if mode == "squash":
        return im.resize((size, size), resample=resample)
    return ImageOps.fit(im, (size, size), method=resample, centering=(0.5, 0.5))


def load_rgb_array(data: bytes, size: int, interpolation: str, mode: str) -> np.ndarray:
    """Encoded image bytes to a ``(size, size, 3)`` uint8 array."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        upright = ImageOps.exif_transpose(im)  # once: for colour images, to_rgb's input
        if upright.mode == "L":
            # Grey: resampled as one band, then copied into three. The same pixels as
            # converting to RGB first (PIL resamples each band alike), at half the cost:
            # most of a small image's decode is the resampling.
            grey = np.asarray(resize(upright, size, interpolation, mode), dtype=np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        return np.asarray(resize(to_rgb(upright), size, interpolation, mode), dtype=np.uint8)
