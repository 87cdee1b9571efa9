"""Source images → RGB tiles: decode with validation, resample, cut, filter background.

Pure functions (PIL + numpy): no Ray, no storage. A source that cannot become an RGB tile raises
:class:`BadImage` with a reason a person can act on; a source that can be converted safely is
converted and the conversion is returned so the manifest can say so.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

# decode_image checks data.max_image_pixels against the header before any pixel is decoded and
# names the size; Pillow's own global check would pre-empt it with a vaguer message.
Image.MAX_IMAGE_PIXELS = None


class BadImage(Exception):
    """This source cannot be used; ``str(exc)`` is the reason recorded in the quarantine."""


@dataclass
class Decoded:
    rgb: np.ndarray  # H×W×3 uint8
    conversion: str | None  # e.g. "CMYK → RGB", None when the source was already 8-bit RGB


def decode_image(data: bytes, max_pixels: int) -> Decoded:
    """Decode image bytes to 8-bit RGB, or raise BadImage saying why not.

    Converted (the manifest records it): CMYK, 16-bit RGB, RGBA/PA/P with alpha (composited on white,
    the colour of an empty slide), palette. Refused: grayscale (H&E needs its colour), bombs,
    truncated or unidentifiable data.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        # The header is read before any pixel: refuse a bomb before allocating it.
        if width * height > max_pixels:
            raise BadImage(
                f"decompression bomb: {width}×{height} pixels exceeds data.max_image_pixels={max_pixels}; "
                "cut the image into regions or raise the limit"
            )
        img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image: no decoder recognises its bytes (wrong extension or corrupt header)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"truncated or corrupt image data: {exc}") from None

    mode = img.mode
    if mode == "RGB":
        # Pillow reads 16-bit colour PNGs as 8-bit RGB (the high byte); say that it happened.
        conversion = "16-bit RGB → 8-bit RGB" if _png_bit_depth(data) == 16 else None
        return Decoded(np.asarray(img, dtype=np.uint8), conversion)
    if mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        raise BadImage(f"grayscale image (mode {mode}): H&E tiles must be colour RGB")
    if mode == "CMYK":
        return Decoded(np.asarray(img.convert("RGB"), dtype=np.uint8), "CMYK → RGB")
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, rgba).convert("RGB")
        return Decoded(np.asarray(flat, dtype=np.uint8), f"{mode} → RGB (alpha composited on white)")
    if mode == "P":
        return Decoded(np.asarray(img.convert("RGB"), dtype=np.uint8), "palette → RGB")
    if mode in ("YCbCr", "LAB", "HSV"):
        return Decoded(np.asarray(img.convert("RGB"), dtype=np.uint8), f"{mode} → RGB")
    raise BadImage(f"unsupported image mode {mode}")


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 29:
        return data[24]  # IHDR's bit depth
    return None


def resample(rgb: np.ndarray, scale: float) -> np.ndarray:
    """Resize by ``scale`` (antialiased when shrinking)."""
    if abs(scale - 1.0) < 1e-6:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)


def square_field(rgb: np.ndarray, tile_size: int, keep_resolution: bool) -> np.ndarray:
    """A labeled tile's field of view: a centred ``tile_size`` crop when the resolution is already
    matched, else the largest centred square (``to_tile_size`` then resizes the whole view)."""
    h, w = rgb.shape[:2]
    if min(h, w) < tile_size:
        raise BadImage(f"tile is {w}×{h} px, smaller than data.tile_size={tile_size}")
    side = tile_size if keep_resolution else min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(rgb[y0 : y0 + side, x0 : x0 + side])


def to_tile_size(square: np.ndarray, tile_size: int) -> np.ndarray:
    if square.shape[0] == tile_size:
        return square
    return np.asarray(Image.fromarray(square).resize((tile_size, tile_size), Image.Resampling.LANCZOS), dtype=np.uint8)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Stained tissue: saturated and neither glass-white nor pen/edge-black."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (mx - mn) / np.maximum(mx, 1.0)
    return (saturation > 0.07) & (mx < 235) & (mx > 30)


def cut_region(rgb: np.ndarray, tile_size: int, min_tissue: float) -> tuple[list[tuple[int, int, np.ndarray]], int]:
    """Cut a region into a centred grid of tiles; keep those with enough tissue.

    Returns ([(x, y, tile)], n_background) with x/y in the given array's pixels.
    """
    h, w = rgb.shape[:2]
    if min(h, w) < tile_size:
        raise BadImage(f"image is {w}×{h} px, smaller than data.tile_size={tile_size}")
    nx, ny = w // tile_size, h // tile_size
    x0, y0 = (w - nx * tile_size) // 2, (h - ny * tile_size) // 2
    kept, background = [], 0
    for j in range(ny):
        for i in range(nx):
            x, y = x0 + i * tile_size, y0 + j * tile_size
            tile = rgb[y : y + tile_size, x : x + tile_size]
            if tissue_mask(tile).mean() >= min_tissue:
                kept.append((x, y, np.ascontiguousarray(tile)))
            else:
                background += 1
    return kept, background


SIGNATURE_SIZE = 16


def dihedral_signature(field: np.ndarray) -> np.ndarray:
    """A 16×16×3 uint8 box-filtered thumbnail of a tile's field of view, taken at the source's
    resolution: box filtering commutes with rotations/flips (a Lanczos resize to a non-integer
    ratio does not), and JPEG re-encoding barely moves it. Used to find duplicate groups."""
    return np.asarray(
        Image.fromarray(field).resize((SIGNATURE_SIZE, SIGNATURE_SIZE), Image.Resampling.BOX), dtype=np.uint8
    )


def encode_png(tile: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
