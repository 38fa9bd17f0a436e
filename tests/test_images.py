"""vgen.data.images and vgen.data.transforms: decoding any image to clean RGB, rejecting bad files
with a stable reason, and the centre-crop + antialiased resize."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vgen.data.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image, to_rgb
from vgen.data.transforms import center_crop_resize

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def close(actual, expected, tol=3) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, dtype=int) - np.asarray(expected, dtype=int)) <= tol))


# ---------------------------------------------------------------- modes -> RGB


def test_rgb_passes_through():
    image = Image.new("RGB", (4, 3), (1, 2, 3))
    assert to_rgb(image) is image
    decoded = decode_image(encode(image))
    assert decoded.mode == "RGB" and decoded.size == (4, 3)
    assert np.all(pixels(decoded) == (1, 2, 3))


def test_rgba_transparent_composited_on_white():
    array = np.zeros((2, 3, 4), dtype=np.uint8)
    array[0, 0] = (10, 20, 30, 0)  # fully transparent: white, whatever the hidden colour
    array[0, 1] = (10, 20, 30, 255)  # opaque: unchanged
    array[0, 2] = (255, 0, 0, 128)  # half-transparent red over white: pink
    array[1, :] = (0, 0, 0, 0)
    image = Image.fromarray(array, mode="RGBA")
    for result in (to_rgb(image), decode_image(encode(image))):
        out = pixels(result)
        assert tuple(out[0, 0]) == WHITE
        assert tuple(out[0, 1]) == (10, 20, 30)
        assert close(out[0, 2], (255, 127, 127), tol=1)
        assert np.all(out[1] == 255)


def test_la_composited_on_white():
    array = np.array([[[0, 0], [0, 255], [100, 255]]], dtype=np.uint8)
    image = Image.fromarray(array, mode="LA")
    for result in (to_rgb(image), decode_image(encode(image))):
        out = pixels(result)
        assert out.shape == (1, 3, 3)
        assert tuple(out[0, 0]) == WHITE  # black but transparent
        assert tuple(out[0, 1]) == (0, 0, 0)
        assert tuple(out[0, 2]) == (100, 100, 100)


def test_palette_with_transparency():
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 black, index 1 red
    image.putpixel((1, 0), 1)
    data = encode(image, transparency=0)  # index 0 transparent
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = pixels(decode_image(data))
    assert tuple(out[0, 1]) == RED
    assert tuple(out[0, 0]) == WHITE and tuple(out[1, 3]) == WHITE


def test_palette_without_transparency_keeps_colours():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    out = pixels(decode_image(encode(image)))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 1]) == BLUE


def test_rgb_with_transparent_colour_key():
    # A PNG tRNS chunk on an RGB image: pixels of that exact colour are transparent.
    image = Image.new("RGB", (2, 1), GREEN)
    image.putpixel((1, 0), RED)
    data = encode(image, transparency=GREEN)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == GREEN
    out = pixels(decode_image(data))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == RED


def test_grayscale_with_transparent_colour_key():
    image = Image.new("L", (2, 1), 7)
    image.putpixel((1, 0), 200)
    out = pixels(decode_image(encode(image, transparency=7)))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (200, 200, 200)


def test_cmyk_jpeg_to_rgb():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = pixels(decode_image(data))
    assert out.shape == (16, 16, 3)
    assert close(out, RED, tol=8)


def test_16bit_grayscale_scaled_not_clipped():
    array = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    for result in (to_rgb(image), decode_image(data)):
        out = pixels(result)
        assert out.shape == (1, 4, 3)
        assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])  # gray
        assert out[0, 0, 0] == 0
        assert out[0, 1, 0] == 100
        assert abs(out[0, 2, 0] - 128) <= 1
        assert out[0, 3, 0] == 255  # Pillow's convert("L") would have clipped everything above 255 to 255


def test_32bit_int_mode_clipped_to_16_bits():
    image = Image.fromarray(np.array([[-5, 65535, 100000]], dtype=np.int32), mode="I")
    out = pixels(to_rgb(image))
    assert list(out[0, :, 0]) == [0, 255, 255]


def test_float_mode_scaled():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32), mode="F")
    assert list(pixels(to_rgb(unit))[0, :, 0]) == [0, 128, 255, 0]
    wide = Image.fromarray(np.array([[0.0, 65535.0, 32896.0]], dtype=np.float32), mode="F")
    out = pixels(to_rgb(wide))[0, :, 0]
    assert out[0] == 0 and out[1] == 255 and abs(out[2] - 128) <= 1


def test_grayscale_to_rgb():
    image = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    out = pixels(decode_image(encode(image)))
    assert out.tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]


def test_bilevel_to_rgb():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    out = pixels(decode_image(encode(image)))
    assert out.tolist() == [[[0, 0, 0], [255, 255, 255]]]


# ---------------------------------------------------------------- EXIF orientation


def _left_red_right_blue_jpeg(orientation: int) -> bytes:
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = RED
    array[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(array), "JPEG", quality=95, exif=exif)


def test_exif_orientation_6_rotates_clockwise():
    data = _left_red_right_blue_jpeg(6)
    assert Image.open(io.BytesIO(data)).size == (40, 20)  # stored landscape
    image = decode_image(data)
    assert image.size == (20, 40)  # shown portrait
    out = pixels(image)
    # Rotating 90° clockwise moves the left (red) half to the top.
    assert close(out[5, 10], RED, tol=10)
    assert close(out[34, 10], BLUE, tol=10)


def test_exif_orientation_8_rotates_counterclockwise():
    image = decode_image(_left_red_right_blue_jpeg(8))
    assert image.size == (20, 40)
    out = pixels(image)
    # Rotating 90° counter-clockwise moves the left (red) half to the bottom.
    assert close(out[5, 10], BLUE, tol=10)
    assert close(out[34, 10], RED, tol=10)


def test_exif_orientation_1_unchanged():
    image = decode_image(_left_red_right_blue_jpeg(1))
    assert image.size == (40, 20)
    out = pixels(image)
    assert close(out[10, 5], RED, tol=10) and close(out[10, 34], BLUE, tol=10)


# ---------------------------------------------------------------- rejected files


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **kwargs)
    assert str(info.value).startswith(info.value.reason + ": ")
    assert info.value.detail
    return info.value.reason


def test_empty_file():
    assert _reason(b"") == "empty_file"


def test_text_is_not_an_image():
    assert _reason(b"a red cube on a table\n") == "not_an_image"
    assert _reason(b"\x00" * 100) == "not_an_image"


def _noise(size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt):
    data = encode(_noise(), fmt)
    decode_image(data)  # the whole file is fine
    assert _reason(data[: len(data) // 2]) in ("truncated", "decode_error")


def test_truncated_png_says_truncated():
    data = encode(_noise(), "PNG")
    assert _reason(data[: len(data) // 2]) == "truncated"


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim width x height (with a correct CRC)."""
    data = bytearray(encode(Image.new("L", (1, 1), 0)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb():
    data = _png_claiming(30000, 30000)
    with pytest.raises(Image.DecompressionBombError):  # the patched header really claims 30000x30000
        Image.open(io.BytesIO(data))
    assert _reason(data) == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # the global bound is restored


def test_decompression_bomb_below_twice_the_limit():
    # Pillow only warns between max_pixels and 2 * max_pixels; vgen rejects those too.
    side = int((1.5 * DEFAULT_MAX_PIXELS) ** 0.5)
    assert _reason(_png_claiming(side, side)) == "decompression_bomb"


def test_max_pixels_respected():
    data = encode(Image.new("RGB", (100, 100), RED))
    assert decode_image(data).size == (100, 100)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)  # exactly at the limit: fine
    assert _reason(data, max_pixels=9_999) == "decompression_bomb"  # just above: warning range
    assert _reason(data, max_pixels=1_000) == "decompression_bomb"  # far above: error range
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS
    # After a rejection with a small bound, the default bound applies again.
    assert decode_image(data).size == (100, 100)


def test_bomb_check_disabled_with_none():
    data = encode(Image.new("RGB", (100, 100), RED))
    assert decode_image(data, max_pixels=None).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS


# ---------------------------------------------------------------- transforms


def test_center_crop_resize_shape_and_dtype():
    out = center_crop_resize(_noise((50, 30)), 16)
    assert out.shape == (3, 16, 16)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


def test_center_crop_resize_channel_order():
    out = center_crop_resize(Image.new("RGB", (20, 20), (10, 20, 30)), 8)
    assert np.all(out[0] == 10) and np.all(out[1] == 20) and np.all(out[2] == 30)


def _thirds(size, axis, colours=(RED, GREEN, BLUE)) -> Image.Image:
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    n = width if axis == 1 else height
    for k, colour in enumerate(colours):
        sl = slice(k * n // 3, (k + 1) * n // 3)
        if axis == 1:
            array[:, sl] = colour
        else:
            array[sl, :] = colour
    return Image.fromarray(array)


def test_center_crop_keeps_centre_third_of_wide_image():
    image = _thirds((300, 100), axis=1)
    # At the crop's own size the result is exactly the centre third.
    exact = center_crop_resize(image, 100)
    assert np.all(exact[0] == 0) and np.all(exact[1] == 255) and np.all(exact[2] == 0)
    # Downscaled: the interior is pure green; the edges may only see a little of the neighbours
    # (the filter support reaches just outside the box, as in resize-then-crop).
    small = center_crop_resize(image, 16).astype(int)
    assert np.all(small[:, :, 2:-2] == np.array(GREEN)[:, None, None])
    assert np.all(small[1] >= 200)
    assert np.all(small[0] <= 60) and np.all(small[2] <= 60)


def test_center_crop_keeps_centre_third_of_tall_image():
    image = _thirds((100, 300), axis=0)
    exact = center_crop_resize(image, 100)
    assert np.all(exact[1] == 255) and np.all(exact[0] == 0) and np.all(exact[2] == 0)


def test_resize_is_antialiased():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = Image.fromarray(checker, mode="L").convert("RGB")
    out = center_crop_resize(image, 8).astype(int)
    assert out.shape == (3, 8, 8)
    # A point-sampling resize would give only 0s and 255s; an antialiased one averages to mid-gray.
    assert np.all(np.abs(out - 128) <= 8), out[0]
