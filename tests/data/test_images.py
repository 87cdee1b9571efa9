import io

import numpy as np
import pytest
from PIL import Image

from histodiff_ray.data import images
from tests.data.badfiles import png_16bit_rgb, png_bomb_header


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


RGB = Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8))


def test_rgb_decodes_unchanged():
    out = images.decode_image(_png(RGB), 10_000_000)
    assert out.conversion is None and np.array_equal(out.rgb, np.asarray(RGB))


def test_sixteen_bit_rgb_keeps_the_high_byte_and_says_so():
    out = images.decode_image(png_16bit_rgb(np.asarray(RGB)), 10_000_000)
    assert out.conversion == "16-bit RGB → 8-bit RGB"
    assert np.array_equal(out.rgb, np.asarray(RGB))


def test_rgba_is_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    out = images.decode_image(_png(Image.fromarray(rgba, "RGBA")), 10_000_000)
    assert "alpha composited on white" in out.conversion
    assert (out.rgb[:8, :, 0] == 200).all() and (out.rgb[8:] == 255).all()


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello world, not pixels", "not an image"),
        (png_bomb_header(30000), "decompression bomb: 30000×30000"),
        (_png(RGB.convert("L")), "grayscale"),
        (_png(RGB)[:200], "truncated"),
    ],
)
def test_bad_images_raise_with_a_reason(data, reason):
    with pytest.raises(images.BadImage, match=reason):
        images.decode_image(data, 50_000_000)


def test_tissue_filter_rejects_glass_and_keeps_stain():
    glass = np.full((64, 64, 3), 242, np.uint8)
    stain = np.zeros((64, 64, 3), np.uint8)
    stain[..., 0], stain[..., 1], stain[..., 2] = 200, 120, 180  # eosin pink
    region = np.concatenate([glass, stain], axis=1)  # 64×128: one glass tile, one tissue tile
    kept, background = images.cut_region(region, 64, 0.5)
    assert background == 1 and [(x, y) for x, y, _ in kept] == [(64, 0)]


def test_square_field_refuses_tiles_smaller_than_the_target():
    with pytest.raises(images.BadImage, match="8×8 px"):
        images.square_field(np.zeros((8, 8, 3), np.uint8), 64, keep_resolution=False)
