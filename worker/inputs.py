"""Turning a request's image reference into a clean RGB picture, or a clear `invalid_input`."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from producer.contract import ErrorCode
from producer.storage import InvalidReference, ObjectNotFound, ObjectStore, StorageUnavailable
from worker.errors import JobFailed


def fetch_image(store: ObjectStore, ref: str) -> bytes:
    try:
        data = store.read(ref)
    except (ObjectNotFound, InvalidReference) as exc:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"image {ref}: {exc}") from None
    except StorageUnavailable as exc:
        raise JobFailed(ErrorCode.STORAGE_UNAVAILABLE, str(exc)) from None
    if not data:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"image {ref} is empty (0 bytes)")
    return data


def open_image(data: bytes) -> Image.Image:
    """Decode fully now, so a truncated file fails here and not halfway through the pipeline."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)  # animated images: the first frame
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"the image could not be decoded: {exc}") from None
