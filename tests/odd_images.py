"""A corpus of hostile and odd images, made here with Pillow. Each: (bytes, renders: bool)."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Iterator

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


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_without_image_data() -> bytes:
    """An animated PNG that claims zero frames and holds no IDAT: Pillow's verify() raised IndexError on it."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"acTL", struct.pack(">II", 0, 0)) + png_chunk(b"IEND", b"")


def corpus() -> dict[str, tuple[bytes, bool]]:
    good = _save(Image.new("RGB", (40, 40), (10, 120, 200)), "PNG")
    return {
        "zero-byte": (b"", False),
        "not-an-image": (b"%PDF-1.4 this is not an image\n" * 10, False),
        "truncated-png": (good[: len(good) // 2], False),
        "corrupt-png": (good[:40] + bytes(range(256)) * 2, False),
        "decompression-bomb": (png_claiming(30000, 30000), False),
        "png-without-image-data": (png_without_image_data(), False),
        "huge-file": (noise_png(400), False),  # over the SVDQ_MAX_IMAGE_BYTES the tests set
        "one-pixel": (_save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), True),
        "16-bit": (sixteen_bit_grey(), True),
        "cmyk-jpeg": (_save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), True),
        "palette-transparency": (palette_with_transparency(), True),
        "animated-gif": (animated(), True),
        "exif-rotated": (exif_rotated(), True),
    }


# Mutation fuzzing, as fuzzers do it: valid files of every readable format, then byte flips, truncations,
# splices, header fields set to 0, huge or negative, and (for PNG, whose chunks carry checksums that would
# otherwise stop most mutants at the first CRC check) chunks dropped, repeated, reordered or forged.


def fuzz_seeds() -> dict[str, bytes]:
    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    turned = base.rotate(90)
    return {
        "png": _save(base, "PNG"),
        "png-palette": palette_with_transparency(),
        "png-16-bit": sixteen_bit_grey(),
        "apng": _save(base, "PNG", save_all=True, append_images=[turned]),
        "jpeg": _save(base, "JPEG"),
        "jpeg-progressive": _save(base, "JPEG", progressive=True),
        "jpeg-exif": exif_rotated(),
        "gif": animated(),
        "webp": _save(base, "WEBP"),
        "webp-lossless": _save(base, "WEBP", lossless=True),
        "webp-animated": _save(base, "WEBP", save_all=True, append_images=[turned]),
        "tiff": _save(base, "TIFF"),
        "tiff-deflate": _save(base, "TIFF", compression="tiff_deflate"),
        "bmp": _save(base, "BMP"),
        "bmp-palette": _save(base.convert("P"), "BMP"),
    }


_EXTREMES_32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFF, 0x10000)
_EXTREMES_16 = (0, 1, 0x7FFF, 0x8000, 0xFFFF)
_PNG_KINDS = (b"IHDR", b"PLTE", b"tRNS", b"acTL", b"fcTL", b"fdAT", b"IDAT", b"IEND", b"iCCP", b"eXIf", b"sBIT")


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]] | None:
    chunks, at = [], 8
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        chunks.append((kind, body))
        at += 12 + length
    return chunks if data.startswith(b"\x89PNG") and chunks else None


def _mutate_png_chunks(r: random.Random, data: bytes) -> bytes:
    chunks = _png_chunks(data)
    if chunks is None:
        return data
    i = r.randrange(len(chunks))
    how = r.randrange(5)
    if how == 0:
        del chunks[i]
    elif how == 1:
        chunks.insert(i, chunks[i])
    elif how == 2:
        j = r.randrange(len(chunks))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif how == 3:  # a field inside a chunk at an extreme, with its checksum made right again
        kind, body = chunks[i]
        if len(body) >= 4:
            at = r.randrange(len(body) - 3)
            body = body[:at] + struct.pack(">I", r.choice(_EXTREMES_32)) + body[at + 4 :]
        chunks[i] = (kind, body)
    else:
        body = bytes(r.randrange(256) for _ in range(r.choice((0, 1, 4, 8, 13, 26, 40))))
        chunks.insert(i, (r.choice(_PNG_KINDS), body))
    return data[:8] + b"".join(png_chunk(kind, body) for kind, body in chunks)


def mutate(r: random.Random, data: bytes, others: list[bytes]) -> bytes:
    d = bytearray(data)
    how = r.randrange(7)
    if how == 0:
        for _ in range(r.randint(1, 8)):
            d[r.randrange(len(d))] = r.randrange(256)
    elif how == 1:
        d = d[: r.randrange(len(d))]
    elif how == 2:
        other = r.choice(others)
        d = d[: r.randrange(len(d))] + other[r.randrange(len(other)) :]
    elif how == 3:  # header fields live near the start
        at = r.randrange(max(1, min(len(d) - 4, 256)))
        d[at : at + 4] = struct.pack(r.choice((">I", "<I")), r.choice(_EXTREMES_32))
    elif how == 4:
        at = r.randrange(max(1, min(len(d) - 2, 256)))
        d[at : at + 2] = struct.pack(r.choice((">H", "<H")), r.choice(_EXTREMES_16))
    elif how == 5:
        at = r.randrange(len(d))
        d[at:at] = bytes(r.randrange(256) for _ in range(r.randint(1, 32)))
    else:
        return _mutate_png_chunks(r, data)
    return bytes(d)


def mutants(seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """`count` mutants, the same ones for the same seed: (name of the file it came from, bytes)."""
    r = random.Random(seed)
    seeds = fuzz_seeds()
    names, others = sorted(seeds), list(seeds.values())
    for _ in range(count):
        name = r.choice(names)
        data = seeds[name]
        for _ in range(r.choice((1, 1, 2, 3))):  # stacked mutations reach deeper
            data = mutate(r, data, others) or data
        yield name, data
