"""The twelve kinds of bad input an ingest must survive, written next to real tiles.

``write_bad_inputs(root, real_jpeg)`` creates them under a labeled input root and returns
{relative path: (outcome, text)} where outcome is "quarantined" or "converted" and text is a
fragment the manifest's reason/conversion must contain.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_16bit_rgb(rgb8: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w = rgb8.shape[:2]
    wide = rgb8.astype(">u2") * 257
    raw = b"".join(b"\x00" + wide[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def png_bomb_header(side: int = 30000) -> bytes:
    """A PNG whose header claims side×side pixels (the data would be enormous; it is not there)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_bad_inputs(root: Path, real_jpeg: Path, cls: str = "H") -> dict[str, tuple[str, str]]:
    rgb = Image.open(real_jpeg).convert("RGB")
    d = root / cls
    d.mkdir(parents=True, exist_ok=True)
    png = _save(rgb, "PNG")
    jpeg = real_jpeg.read_bytes()
    files = {
        f"{cls}/empty.jpg": (b"", "quarantined", "empty file"),
        f"{cls}/truncated.jpg": (jpeg[: len(jpeg) // 2], "quarantined", "truncated"),
        f"{cls}/truncated.png": (png[: len(png) // 2], "quarantined", "truncated"),
        f"{cls}/not_an_image.png": (b"sample_id,label\n1,H\n" * 20, "quarantined", "not an image"),
        f"{cls}/cmyk.jpg": (_save(rgb.convert("CMYK"), "JPEG", quality=95), "converted", "CMYK → RGB"),
        f"{cls}/sixteen_bit.png": (png_16bit_rgb(np.asarray(rgb)), "converted", "16-bit RGB → 8-bit RGB"),
        f"{cls}/rgba.png": (_save(rgb.convert("RGBA"), "PNG"), "converted", "RGBA → RGB"),
        f"{cls}/grayscale.png": (_save(rgb.convert("L"), "PNG"), "quarantined", "grayscale"),
        f"{cls}/tiny.png": (_save(rgb.resize((8, 8)), "PNG"), "quarantined", "8×8 px, smaller than data.tile_size"),
        f"{cls}/bomb.png": (png_bomb_header(), "quarantined", "decompression bomb"),
    }
    expected = {}
    for rel, (data, outcome, text) in files.items():
        (root / rel).write_bytes(data)
        expected[rel] = (outcome, text)
    outside = root.parent / f"outside-{root.name}.jpg"
    outside.write_bytes(jpeg)
    os.symlink(outside, d / "link_outside.jpg")
    expected[f"{cls}/link_outside.jpg"] = ("quarantined", "outside the input root")
    unsafe = root / "bad class!"
    unsafe.mkdir(exist_ok=True)
    (unsafe / "tile.jpg").write_bytes(jpeg)
    expected["bad class!/tile.jpg"] = ("quarantined", "not a safe identifier")
    return expected
