"""Every odd image becomes upright 8-bit RGB or a clear invalid_input (pure function, no services)."""

from __future__ import annotations

import numpy as np
import pytest

from producer.contract import ErrorCode
from tests.odd_images import animated, corpus, exif_rotated, palette_with_transparency, sixteen_bit_grey
from worker.errors import JobFailed
from worker.inputs import open_image

LIMIT = 40_000_000


@pytest.mark.parametrize(("name", "case"), [(n, c) for n, c in corpus().items() if n != "huge-file"])
def test_each_image_renders_or_fails_clearly(name: str, case: tuple[bytes, bool]) -> None:
    data, renders = case
    if renders:
        assert open_image(data, LIMIT).mode == "RGB"
    else:
        with pytest.raises(JobFailed) as err:
            open_image(data, LIMIT)
        assert err.value.code is ErrorCode.INVALID_INPUT and len(err.value.message) > 10


def test_a_bomb_is_refused_from_its_header() -> None:
    with pytest.raises(JobFailed, match="decompression bomb"):
        open_image(corpus()["decompression-bomb"][0], LIMIT)


def test_exif_rotation_is_applied() -> None:
    assert open_image(exif_rotated(), LIMIT).size == (32, 64)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    assert abs(int(np.asarray(open_image(sixteen_bit_grey(), LIMIT))[0, 0, 0]) - 128) <= 1


def test_transparency_lands_on_white() -> None:
    pixels = np.asarray(open_image(palette_with_transparency(), LIMIT))
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[0, 31]) == (255, 255, 255)


def test_animated_images_give_their_first_frame() -> None:
    assert tuple(np.asarray(open_image(animated(), LIMIT))[5, 5]) == (0, 200, 0)


@pytest.mark.parametrize("kind", ["EPS", "PCX", "ICO", "PPM", "TGA", "SGI", "QOI"])
def test_formats_svdq_does_not_take_are_refused_unparsed(kind: str) -> None:
    """Pillow reads these (EPS through Ghostscript, where it is installed): refused before any plugin parses them,
    at submit and in the worker alike."""
    import io

    from PIL import Image

    from producer import images

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format=kind)
    with pytest.raises(images.BadImage, match="PNG, JPEG, WebP, GIF, BMP or TIFF"):
        images.inspect(buf.getvalue(), LIMIT)
    with pytest.raises(JobFailed) as err:
        open_image(buf.getvalue(), LIMIT)
    assert err.value.code is ErrorCode.INVALID_INPUT
