"""Whether untrusted bytes are an image svdq can read: the judgement the client and the worker share.

Pillow parses a dozen formats, and its parsers raise whatever their code raises on a hostile file: a PNG
with no image data makes `verify()` raise IndexError, others give struct.error, KeyError, ZeroDivisionError
or MemoryError. A list of expected exception types is never complete, so the refusal is total: anything a
parser raises while reading the image is the image's fault, and becomes `BadImage` with a readable message.
(A parser that crashes the process cannot be caught here; bench/fuzz_images.py looks for those.)
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

READABLE = "PNG, JPEG, WebP, GIF, BMP or TIFF"
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff"}


class BadImage(ValueError):
    """The bytes are not an image svdq can use; the message says why, for the person who sent them."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def suffix(self) -> str:
        return SUFFIXES.get(self.format, ".img")


@contextmanager
def opened(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image, open and within `max_pixels` by its header; whatever Pillow raises inside becomes BadImage.

    The pixel limit is checked before any pixel is decoded, so a decompression bomb costs nothing."""
    if not data:
        raise BadImage("is empty (0 bytes)")
    try:
        # Only the formats svdq takes: Pillow would otherwise try every plugin it has, EPS among them (which runs
        # Ghostscript on the file, where it is installed).
        with Image.open(io.BytesIO(data), formats=list(SUFFIXES)) as img:
            if img.width * img.height > max_pixels:
                size = f"{img.width}x{img.height}"
                raise BadImage(f"is {size}, over SVDQ_MAX_IMAGE_PIXELS={max_pixels} (a decompression bomb?)")
            yield img
    except BadImage:
        raise
    except UnidentifiedImageError:  # Pillow's message names its buffer object, which means nothing to anyone
        raise BadImage(f"is not an image svdq can read ({READABLE})") from None
    except Exception as exc:  # the refusal must be total: see the module's docstring
        raise BadImage(f"is not a readable image ({_described(exc)})") from None


def inspect(data: bytes, max_pixels: int) -> ImageInfo:
    """The image's format and size after Pillow's integrity check (what a producer checks at submit)."""
    with opened(data, max_pixels) as img:
        info = ImageInfo(img.format or "", img.width, img.height)
        img.verify()
    return info


def _described(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
