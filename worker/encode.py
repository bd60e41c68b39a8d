"""uint8 frames -> video bytes, through the ffmpeg that imageio-ffmpeg ships, with no file on disk.

ffmpeg writes into an anonymous in-memory file (memfd): seekable, so the mp4 muxer can move its
index to the front (`+faststart`), and gone as soon as it is closed. Frames reach ffmpeg through a
feeder thread and a queue of `queue_chunks` chunks, so the caller (the GPU decode) does not wait
for the encoder unless it is that many chunks ahead; memory stays bounded by the queue.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np


@dataclass(frozen=True)
class Format:
    extension: str
    content_type: str


FORMATS = {
    "mp4": Format("mp4", "video/mp4"),
    "webm": Format("webm", "video/webm"),
    "gif": Format("gif", "image/gif"),
}


class EncodeError(RuntimeError):
    pass


class EncodeTimeout(EncodeError):
    """ffmpeg was still busy at the writer's deadline (a wedged encoder must not hold the job, or the GPU)."""


# BT.601 limited range, the matrix both ffmpeg's conversion and worker.decode.to_yuv420p use. Tagged so
# players do not guess BT.709 for HD sizes.
_COLOR_TAGS = [
    "-colorspace",
    "smpte170m",
    "-color_primaries",
    "smpte170m",
    "-color_trc",
    "smpte170m",
    "-color_range",
    "tv",
]


def codec_args(fmt: str, *, crf: int, preset: str, x264_params: str = "") -> list[str]:
    if fmt == "mp4":
        tuning = ["-x264-params", x264_params] if x264_params else []
        return [
            "-c:v",
            "libx264",
            "-preset",
            preset,
            *tuning,
            "-crf",
            str(crf),
            "-pix_fmt",
            "yuv420p",
            *_COLOR_TAGS,
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
        ]
    if fmt == "webm":
        # Constant quality VP9; realtime/cpu-used 8 trades size for speed, like a fast x264 preset.
        return [
            "-c:v",
            "libvpx-vp9",
            "-b:v",
            "0",
            "-crf",
            "33",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
            "-row-mt",
            "1",
            "-pix_fmt",
            "yuv420p",
            *_COLOR_TAGS,
            "-f",
            "webm",
        ]
    if fmt == "gif":
        # One palette for the whole clip, computed from the frames themselves.
        return [
            "-filter_complex",
            "split[a][b];[a]palettegen=stats_mode=diff[p];[b][p]paletteuse",
            "-f",
            "gif",
        ]
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


class _Output:
    """Where ffmpeg writes: a memfd on Linux, else a file in a private folder removed on close."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("svdq-video", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}"  # ffmpeg's own /proc/self: the fd is passed down
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="svdq-encode-"))
            self.fd = os.open(self._dir / "video", os.O_RDWR | os.O_CREAT, 0o600)
            self.path = str(self._dir / "video")

    def read(self) -> bytes:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        return os.pread(self.fd, size, 0)

    def close(self) -> None:
        # Once only: a second os.close would hit whatever file took this number meanwhile.
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class VideoWriter:
    def __init__(
        self,
        width: int,
        height: int,
        fps: int,
        *,
        fmt: str = "mp4",
        pix_fmt: str = "rgb24",
        crf: int = 23,
        preset: str = "veryfast",
        x264_params: str = "",
        queue_chunks: int = 2,
        deadline: float = math.inf,
    ):
        """`deadline`, in time.monotonic() seconds: past it, write() and finish() raise EncodeTimeout rather than
        wait for ffmpeg."""
        args = codec_args(fmt, crf=crf, preset=preset, x264_params=x264_params)
        if pix_fmt not in ("rgb24", "yuv420p"):
            raise ValueError(f"pix_fmt must be rgb24 or yuv420p, not {pix_fmt!r}")
        self.width, self.height, self.fps, self.format = width, height, fps, FORMATS[fmt]
        # One frame as write() takes it: (H, W, 3) pixels, or the three planes of 4:2:0 laid end to end.
        self.frame_shape = (height, width, 3) if pix_fmt == "rgb24" else (height * width * 3 // 2,)
        self.frames = 0
        self.deadline = deadline
        self._out = _Output()
        self._log = _Output()
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            pix_fmt,
            "-s",
            f"{width}x{height}",
            "-framerate",
            str(fps),
            "-i",
            "pipe:0",
            *args,
            self._out.path,
        ]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._log.fd,
            pass_fds=(self._out.fd,),
        )
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=queue_chunks)
        self._failure: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, name="svdq-encode-feeder", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        try:
            while (chunk := self._queue.get()) is not None:
                stdin.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        except BaseException as exc:  # ffmpeg died: remember why, keep draining so write() never blocks
            self._failure = exc
            while self._queue.get() is not None:
                pass
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def write(self, frames: np.ndarray) -> None:
        """Queue frames shaped (n, *frame_shape), uint8; blocks only when the queue is full."""
        if frames.dtype != np.uint8 or frames.shape[1:] != self.frame_shape:
            raise ValueError(f"expected (n, {self.frame_shape}) uint8, got {frames.shape} {frames.dtype}")
        if self._proc is None:
            raise EncodeError("writer already finished")
        self._raise_if_failed()
        try:
            self._queue.put(frames, timeout=self._left())
        except queue.Full:
            raise EncodeTimeout("stopped taking frames") from None
        self.frames += len(frames)

    def finish(self) -> bytes:
        """Wait for ffmpeg to finish and return the encoded bytes."""
        try:
            if self._proc is None:
                raise EncodeError("writer already finished")
            try:
                self._queue.put(None, timeout=self._left())
                self._feeder.join(timeout=self._left())
                code = self._proc.wait(timeout=self._left())
            except (queue.Full, subprocess.TimeoutExpired):
                raise EncodeTimeout("was still encoding") from None
            self._feeder.join(timeout=1)  # ffmpeg is done: the feeder's last write returned or failed
            if self._feeder.is_alive():
                raise EncodeTimeout("was still taking frames")
            self._proc = None
            self._raise_if_failed(code)
            return self._out.read()
        finally:
            self.close()

    def _left(self) -> float | None:
        """Seconds to the deadline for a blocking wait (None: no deadline); 0 once it is past."""
        return None if self.deadline == math.inf else max(0.0, self.deadline - time.monotonic())

    def _raise_if_failed(self, code: int | None = None) -> None:
        if self._failure is not None or code:
            detail = self._log.read().decode(errors="replace").strip()[-2000:]
            raise EncodeError(f"ffmpeg failed ({code=}): {detail or self._failure!r}")

    def close(self) -> None:
        """Stop ffmpeg if it still runs and free everything; safe to call twice."""
        if self._proc is not None:
            self._proc.kill()
            if self._feeder.is_alive():
                self._queue.put(None)  # the feeder drains after a broken pipe, so this never blocks long
            self._feeder.join(timeout=10)
            self._proc.wait()
            self._proc = None
        self._out.close()
        self._log.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
