"""Decode one image file into a clean 8-bit RGB picture, or say exactly why it cannot be used.

Every decision here exists because real caption folders contain such files: phone photos rotated by
EXIF, transparent PNGs (composited on white, as a viewer shows them), CMYK JPEGs, 16-bit scans,
truncated downloads and decompression bombs.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's default bound (~89.5 megapixels); above it an image is treated as a decompression bomb.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class ImageRejected(Exception):
    """An image that cannot become a training example; `reason` is a stable code for the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode `data` and return an RGB image with EXIF orientation applied."""
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    with warnings.catch_warnings():
        # Pillow only warns between max_pixels and 2x max_pixels; treat every bomb the same way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        default_max_pixels, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # a full decode: lazy `open` alone misses truncated or corrupt pixel data
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("decompression_bomb", str(e)) from None
        except UnidentifiedImageError:
            raise ImageRejected("not_an_image", "not a format Pillow can read") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            message = str(e) or type(e).__name__
            reason = "truncated" if "truncated" in message or isinstance(e, EOFError) else "decode_error"
            raise ImageRejected(reason, message) from None
        finally:
            Image.MAX_IMAGE_PIXELS = default_max_pixels
        width, height = image.size
        if width == 0 or height == 0:
            raise ImageRejected("decode_error", f"image has size {width}x{height}")
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as e:  # a corrupt EXIF block should not lose an otherwise good image
            image.info.pop("exif", None)
            warnings.warn(f"ignoring unreadable EXIF orientation: {e}", stacklevel=2)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:  # RGB with a tRNS colour key is composited below
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK, YCbCr, LAB, HSV, L, 1, P without transparency.
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and float images: scale to 8 bits (Pillow's own convert clips them instead)."""
    array = np.asarray(image)
    if image.mode == "F":
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        peak = 1.0 if finite.max(initial=0.0) <= 1.0 else 65535.0
        scaled = np.clip(finite / peak * 255.0 + 0.5, 0, 255)
    else:
        # 'I' mode holds 16-bit PNG samples in int32; values above 65535 are clipped.
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0 + 0.5
    gray = Image.fromarray(scaled.astype(np.uint8), mode="L")
    return gray.convert("RGB")
