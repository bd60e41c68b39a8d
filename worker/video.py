"""Image in, encoded video out, on the device: denoise, streamed decode, encode. No Redis, no storage.

Both the job (worker.render) and the GPU benchmark (bench/gpu_svd.py) run exactly this: `start_video`
does the device work and returns a PendingVideo, whose `finish()` waits for the encoder's last frames.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from producer.contract import JobParams, Stage
from worker.decode import ChunkedDecoder, to_yuv420p
from worker.encode import Format, VideoWriter
from worker.pipeline import Renderer
from worker.settings import WorkerSettings
from worker.tuning import compile_seconds

log = logging.getLogger(__name__)

ProgressFn = Callable[..., None]  # (stage, fraction, *, force=False, **fields); may raise to stop the render


@dataclass
class Video:
    data: bytes
    frames: int
    format: Format


class Stopwatch:
    """Accumulates seconds per stage into a `timings` dict."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def add(self, stage: str, started: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - started, 4)


def _no_progress(stage: str, fraction: float, *, force: bool = False, **fields: Any) -> None:
    return None


@dataclass
class PendingVideo:
    """A render whose device work is done; the encoder may still be busy with the last frames."""

    writer: VideoWriter
    clock: Stopwatch

    def finish(self) -> Video:
        started = time.perf_counter()
        try:
            data = self.writer.finish()
        finally:
            self.clock.add("encode", started)
        return Video(data=data, frames=self.writer.frames, format=self.writer.format)

    def close(self) -> None:
        self.writer.close()


def start_video(
    renderer: Renderer,
    image: Image.Image,
    params: JobParams,
    seed: int,
    settings: WorkerSettings,
    *,
    timings: dict[str, float],
    memory: dict[str, Any],
    progress: ProgressFn = _no_progress,
    checkpoint: Callable[[], None] | None = None,
    deadline: float = math.inf,
) -> PendingVideo:
    """Everything that needs the device; the caller finishes (or closes) what it returns. `checkpoint` runs
    between the UNet's blocks and may raise to stop the render mid-step. Past `deadline` (time.monotonic()) the
    encoder's waits raise EncodeTimeout (worker.encode)."""
    clock = Stopwatch(timings)

    # 1. Denoise to latents on the device (retried with forward chunking on out-of-memory). A shape the
    #    compiled UNet has not seen compiles first where allowed (the record shows the stage and
    #    `timings.compile`), else runs uncompiled.
    compiled_before = compile_seconds()
    if renderer.compiles and not renderer.runs_compiled(params):
        log.warning(
            "%dx%d, %d frames is not a compiled shape: the UNet runs uncompiled (SVDQ_COMPILE_SHAPES adds shapes)",
            params.width,
            params.height,
            params.num_frames,
        )
    progress(Stage.COMPILE if renderer.needs_compile(params) else Stage.DENOISE, 0.05, force=True)
    started = time.perf_counter()
    renderer.checkpoint = checkpoint
    try:
        latents = renderer.denoise(
            image,
            params,
            seed,
            on_step=lambda done, total: progress(
                Stage.DENOISE, 0.05 + 0.8 * done / total, step=done, total_steps=total
            ),
        )
    except BaseException:
        # Stopped (canceled, handed back) or failed: the device work already queued runs on. Waiting for it here
        # means the next job finds the device free. An error the device reports now is left to that job.
        with contextlib.suppress(Exception):
            renderer.synchronize()
        raise
    finally:
        renderer.checkpoint = None
        memory["forward_chunking"] = renderer.forward_chunking
    renderer.synchronize()
    clock.add("denoise", started)
    if (compiled := compile_seconds() - compiled_before) > 0:
        timings["compile"] = round(compiled, 4)
        timings["denoise"] = round(timings["denoise"] - compiled, 4)

    # 2. Decode chunk by chunk (halved on out-of-memory), each chunk converted to YUV on the device and
    #    queued for the encoder, which works in its own process meanwhile.
    chunk = renderer.choose_decode_chunk(params.decode_chunk_size or settings.decode_chunk_size, params)
    decoder = ChunkedDecoder(renderer.vae, latents, chunk, stance=renderer.decode_stance)
    progress(Stage.DECODE, 0.85, force=True)
    writer = VideoWriter(
        params.width,
        params.height,
        params.fps,
        fmt=params.format,
        pix_fmt="yuv420p",
        crf=settings.x264_crf,
        preset=settings.x264_preset,
        x264_params=settings.x264_params,
        deadline=deadline,
    )
    try:
        started = time.perf_counter()
        for frames in decoder:
            yuv = to_yuv420p(frames)  # copies to the host, so the decode is done when this returns
            clock.add("decode", started)
            started = time.perf_counter()
            writer.write(yuv)
            clock.add("encode", started)
            progress(Stage.DECODE, 0.85 + 0.1 * writer.frames / params.num_frames)
            started = time.perf_counter()
        clock.add("decode", started)
    except BaseException:
        writer.close()
        raise
    finally:
        memory.update(decode_chunk_size=decoder.chunk_size, decode_chunk_halvings=decoder.halvings)
    return PendingVideo(writer=writer, clock=clock)
