"""uint8 frames -> H.264 mp4 bytes through the ffmpeg that imageio-ffmpeg ships.

The mp4 goes through a private temporary folder because `+faststart` rewrites the file's head
after encoding, which a pipe cannot do; the folder is removed however the encode ends.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np


class Mp4Writer:
    def __init__(self, width: int, height: int, fps: int, *, crf: int = 18, preset: str = "veryfast"):
        self.width, self.height, self.fps = width, height, fps
        self.frames = 0
        self._dir = Path(tempfile.mkdtemp(prefix="svdq-encode-"))
        self._path = self._dir / "video.mp4"
        # quality=None: imageio-ffmpeg would otherwise add its own -crf; macro_block_size=1: never rescale.
        self._gen: Generator[Any, Any, None] | None = imageio_ffmpeg.write_frames(
            str(self._path),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-preset", preset, "-crf", str(crf), "-movflags", "+faststart"],
        )
        self._gen.send(None)

    def write(self, frames: np.ndarray) -> None:
        """Append frames shaped (n, height, width, 3), uint8."""
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected (n, {self.height}, {self.width}, 3) uint8, got {frames.shape} {frames.dtype}"
            )
        assert self._gen is not None, "writer already finished"
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame))
            self.frames += 1

    def finish(self) -> bytes:
        """Close the stream and return the mp4's bytes."""
        try:
            assert self._gen is not None, "writer already finished"
            self._gen.close()
            self._gen = None
            return self._path.read_bytes()
        finally:
            self.close()

    def close(self) -> None:
        if self._gen is not None:
            # ffmpeg may have died already; the folder must go regardless.
            with contextlib.suppress(Exception):
                self._gen.close()
            self._gen = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
