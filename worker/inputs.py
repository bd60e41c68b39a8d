"""Turning a request's image reference into a clean RGB picture, or a clear `invalid_input`.

Whatever arrives (truncated, not an image, a decompression bomb, 16-bit, CMYK, palette with
transparency, animated, EXIF-rotated) either becomes an upright 8-bit RGB image or fails the job with
a message that says why. Nothing here can take the worker down.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from producer import images
from producer.contract import ErrorCode
from producer.netguard import HTTPFailure, Stopped, fetch
from producer.storage import ObjectNotFound, ObjectStore, StorageUnavailable
from worker.errors import JobFailed


def fetch_image(
    store: ObjectStore,
    ref: str,
    max_bytes: int,
    *,
    allow_private_urls: bool = False,
    deadline: float = 60.0,
    stop: Callable[[], bool] | None = None,
) -> bytes:
    """The input's bytes, at most `max_bytes` read. A URL's download ends within `deadline` seconds, or once
    `stop()` is true (the caller's checkpoint then says why)."""
    try:
        if ref.startswith(("http://", "https://")):
            data = fetch(ref, max_bytes=max_bytes, allow_private=allow_private_urls, deadline=deadline, stop=stop)
        else:
            data = store.read(ref, limit=max_bytes)
    except (ObjectNotFound, ValueError) as exc:  # InvalidReference, UnsafeURL, TooLarge, BadResponse are ValueErrors
        raise JobFailed(ErrorCode.INVALID_INPUT, f"image {_shown(ref)}: {exc}") from None
    except HTTPFailure as exc:
        code = ErrorCode.STORAGE_UNAVAILABLE if exc.status >= 500 or exc.status == 429 else ErrorCode.INVALID_INPUT
        raise JobFailed(code, f"image {_shown(ref)}: {exc}") from None
    except Stopped as exc:  # a host this slow holds the GPU for as long as it likes: not retried
        raise JobFailed(
            ErrorCode.INVALID_INPUT, f"image {_shown(ref)}: the download {exc} (SVDQ_FETCH_TIMEOUT)"
        ) from None
    except (StorageUnavailable, OSError) as exc:  # unreachable store or host, timeouts: worth a retry
        raise JobFailed(ErrorCode.STORAGE_UNAVAILABLE, f"image {_shown(ref)}: {type(exc).__name__}: {exc}") from None
    if not data:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"image {_shown(ref)} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise JobFailed(
            ErrorCode.INVALID_INPUT,
            f"image {_shown(ref)} is larger than SVDQ_MAX_IMAGE_BYTES={max_bytes} bytes",
        )
    return data


def _shown(ref: str) -> str:
    """The reference without its query string, which for presigned URLs holds a signature."""
    return ref.split("?", 1)[0]


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode fully now, so a truncated file fails here and not halfway through the pipeline."""
    try:
        with images.opened(data, max_pixels) as img:
            img.seek(0)  # animated images: the first frame
            return to_rgb(ImageOps.exif_transpose(img))
    except images.BadImage as exc:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"the image {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB: high bit depths scaled (not clipped), transparency over white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
        img = Image.fromarray(np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P without transparency: Pillow's own conversions


def fit(img: Image.Image, width: int, height: int) -> Image.Image:
    """The image at the video's size, as SVD expects it (and as its CLIP resize needs for tiny inputs)."""
    return img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BICUBIC)
