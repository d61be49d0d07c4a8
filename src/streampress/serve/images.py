"""Frames from the network: JPEG / PNG bytes or ``data:`` URLs to ``uint8 [H, W, 3]`` RGB.

Sizes are checked before anything is decoded: the encoded bytes against
``Limits.max_frame_bytes`` (from the base64 length, before decoding it), the pixel count
against ``Limits.max_frame_pixels`` from the image header (before the pixels are decoded).
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np

from .config import Limits, ServeError

__all__ = ["decode_data_url", "decode_image", "encoded_size"]

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
MIME_FORMATS = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG"}


def encoded_size(data_url: str) -> int:
    """Bytes a base64 data URL decodes to (an upper bound), without decoding it."""
    comma = data_url.find(",")
    return (len(data_url) - comma - 1) * 3 // 4


def decode_data_url(url, limits: Limits, size=None, param: str = "image_url") -> np.ndarray:
    """A ``data:image/jpeg;base64,...`` or ``data:image/png;base64,...`` URL to RGB pixels."""
    if not isinstance(url, str):
        raise ServeError(f"{param}: expected a data URL string, got {type(url).__name__}", param=param,
                         code="invalid_image")
    match = _DATA_URL.match(url[:256])
    if not match or not match["b64"]:
        raise ServeError(f"{param}: expected a base64 data URL (data:image/jpeg;base64,... or "
                         "data:image/png;base64,...); remote image URLs are not fetched", param=param,
                         code="invalid_image")
    mime = (match["mime"] or "").lower()
    if mime not in MIME_FORMATS:
        raise ServeError(f"{param}: unsupported image type {mime or 'none'!r}; send image/jpeg or image/png",
                         param=param, code="invalid_image")
    if encoded_size(url) > limits.max_frame_bytes:
        raise ServeError(f"{param}: the image is {encoded_size(url)} bytes, over the limit of "
                         f"{limits.max_frame_bytes} bytes", param=param, code="frame_too_large", status=413)
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(f"{param}: the data URL is not valid base64", param=param, code="invalid_image") from None
    return decode_image(data, limits, size, param, expected=MIME_FORMATS[mime])


def decode_image(data: bytes, limits: Limits, size=None, param: str = "image", expected: str | None = None
                 ) -> np.ndarray:
    """JPEG or PNG ``data`` to ``uint8 [H, W, 3]`` RGB, resized as ``size`` says (an int:
    the longer side; ``(W, H)``: both; None: as decoded)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_frame_bytes:
        raise ServeError(f"{param}: the image is {len(data)} bytes, over the limit of {limits.max_frame_bytes} "
                         "bytes", param=param, code="frame_too_large", status=413)
    if not data:
        raise ServeError(f"{param}: the image is empty", param=param, code="invalid_image")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ServeError(f"{param}: not a readable JPEG or PNG image", param=param, code="invalid_image") from None
    if image.format not in ("JPEG", "PNG") or (expected is not None and image.format != expected):
        raise ServeError(f"{param}: the data is {image.format or 'unknown'}, expected "
                         f"{expected or 'JPEG or PNG'}", param=param, code="invalid_image")
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_frame_pixels:
        raise ServeError(f"{param}: the image is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{limits.max_frame_pixels} pixels", param=param, code="frame_too_large", status=413)
    try:
        image = image.convert("RGB")
        if size is not None:
            image = image.resize(_target_size(size, width, height), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError):
        raise ServeError(f"{param}: the image data is corrupt", param=param, code="invalid_image") from None
    return np.ascontiguousarray(pixels)


def _target_size(size, width: int, height: int) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))
