"""A corpus of hostile and odd images, made here with Pillow. Each: (bytes, renders: bool)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels: a decompression bomb's calling card."""
    data = bytearray(_save(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def exif_rotated() -> bytes:
    """64 wide, 32 high as stored, orientation 6: upright it is 32 wide, 64 high."""
    img = Image.new("RGB", (64, 32), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", exif=exif.tobytes())


def sixteen_bit_grey() -> bytes:
    return _save(Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)), "PNG")  # mid grey


def palette_with_transparency() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 16, 32))
    return _save(img, "PNG", transparency=0)  # left half red, right half transparent


def animated() -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((0, 200, 0), (0, 0, 200))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def noise_png(side: int) -> bytes:
    return _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)), "PNG")


def corpus() -> dict[str, tuple[bytes, bool]]:
    good = _save(Image.new("RGB", (40, 40), (10, 120, 200)), "PNG")
    return {
        "zero-byte": (b"", False),
        "not-an-image": (b"%PDF-1.4 this is not an image\n" * 10, False),
        "truncated-png": (good[: len(good) // 2], False),
        "corrupt-png": (good[:40] + bytes(range(256)) * 2, False),
        "decompression-bomb": (png_claiming(30000, 30000), False),
        "huge-file": (noise_png(400), False),  # over the SVDQ_MAX_IMAGE_BYTES the tests set
        "one-pixel": (_save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), True),
        "16-bit": (sixteen_bit_grey(), True),
        "cmyk-jpeg": (_save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), True),
        "palette-transparency": (palette_with_transparency(), True),
        "animated-gif": (animated(), True),
        "exif-rotated": (exif_rotated(), True),
    }
