"""Whatever bytes arrive, the image checks answer with a refusal or an image, never another exception.

Mutants of valid PNG, JPEG, GIF, WebP, TIFF and BMP files (tests/odd_images.py), the same ones on every run.
Before the checks were total, these found IndexError, struct.error and others escaping `svdq submit`."""

from __future__ import annotations

import pytest

from producer import images
from producer.contract import ErrorCode
from tests.odd_images import mutants, png_without_image_data
from worker.errors import JobFailed
from worker.inputs import open_image

LIMIT = 4096 * 4096
# Pillow warns about some broken files (and the suite turns warnings into errors); in production a warning is
# not an exception, so here it is not one either.
pytestmark = pytest.mark.filterwarnings("ignore:::PIL.*")


def test_the_submit_check_refuses_or_accepts_every_mutant() -> None:
    accepted = refused = 0
    for _name, data in mutants(seed=1, count=10_000):
        try:
            info = images.inspect(data, LIMIT)
        except images.BadImage as exc:
            refused += 1
            assert str(exc)
        else:
            accepted += 1
            assert info.width * info.height <= LIMIT
    assert refused > 3_000 and accepted > 1_000  # the mutants reach both answers: the fuzzing means something


def test_the_worker_decodes_or_fails_every_mutant_as_invalid_input() -> None:
    for _name, data in mutants(seed=2, count=3_000):
        try:
            image = open_image(data, LIMIT)
        except JobFailed as exc:
            assert exc.code is ErrorCode.INVALID_INPUT and exc.message.startswith("the image ")
        else:
            assert image.mode == "RGB"


def test_a_png_with_no_image_data_is_refused_naming_why() -> None:
    with pytest.raises(images.BadImage, match=r"is not a readable image \(IndexError"):
        images.inspect(png_without_image_data(), LIMIT)
