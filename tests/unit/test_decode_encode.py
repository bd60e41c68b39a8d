"""Chunked decode, OOM halving, colour conversion and the encoder (tiny model, in process, no services)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from producer.contract import JobParams
from worker.decode import ChunkedDecoder, DecodeProfile, OutOfMemory, profile_decode, to_rgb24, to_yuv420p
from worker.encode import EncodeError, EncodeTimeout, VideoWriter
from worker.outcome import error_of
from worker.pipeline import Renderer
from worker.tiny_model import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe() -> Any:
    return build_tiny_pipeline()


def decode_all(vae: Any, latents: torch.Tensor, chunk: int, **kw: Any) -> tuple[np.ndarray, ChunkedDecoder]:
    decoder = ChunkedDecoder(vae, latents, chunk, **kw)
    return np.concatenate([to_rgb24(frames) for frames in decoder]), decoder


def ffmpeg_decode(data: bytes, suffix: str) -> tuple[int, bytes]:
    """Decode every frame back to rgb24; return the frame count and ffmpeg's description of the input."""
    with tempfile.NamedTemporaryFile(suffix=suffix) as fh:
        fh.write(data)
        fh.flush()
        run = subprocess.run(
            [
                imageio_ffmpeg.get_ffmpeg_exe(),
                "-hide_banner",
                "-i",
                fh.name,
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-",
            ],
            capture_output=True,
            check=True,
        )
    return len(run.stdout), run.stderr


def smooth_frames(n: int, height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for t in range(n):
        frames[t, ..., 0] = (x * 3 + t * 10) % 256
        frames[t, ..., 1] = y * 4
        frames[t, ..., 2] = 200 - t * 5
    return frames


@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_chunked_decode_matches_the_pipelines_decode(pipe: Any, chunk: int) -> None:
    torch.manual_seed(1)
    latents = torch.randn(1, 6, 4, 16, 16)
    ours, decoder = decode_all(pipe.vae, latents, chunk)
    with torch.no_grad():
        decoded = pipe.decode_latents(latents, num_frames=6, decode_chunk_size=chunk)
    stock = pipe.video_processor.postprocess_video(video=decoded, output_type="pil")[0]
    assert ours.shape == (6, 16 * pipe.vae_scale_factor, 16 * pipe.vae_scale_factor, 3) and ours.dtype == np.uint8
    # The decoded floats agree to about 1e-6 (operations in another order); a value on a rounding edge can
    # then land one level apart.
    diff = np.abs(ours.astype(int) - np.stack([np.asarray(frame) for frame in stock]).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert (decoder.chunk_size, decoder.halvings) == (chunk, 0)


def test_streamed_frames_equal_the_stock_pipeline_all_at_once(pipe: Any) -> None:
    """svdq's path (latents, then chunks streamed out) against `pipe(...)` decoding every frame itself."""
    image = Image.new("RGB", (64, 64), (180, 90, 40))
    params = JobParams(width=64, height=64, num_frames=6, num_inference_steps=2, decode_chunk_size=3)
    renderer = Renderer(pipe=pipe, device=torch.device("cpu"), dtype=torch.float32)
    latents = renderer.denoise(image, params, seed=5, on_step=lambda done, total: None)
    streamed, _ = decode_all(pipe.vae, latents, 3)

    with torch.no_grad():
        stock = pipe(
            image,
            width=64,
            height=64,
            num_frames=6,
            num_inference_steps=2,
            decode_chunk_size=3,
            generator=torch.Generator("cpu").manual_seed(5),
            output_type="np",
        ).frames[0]
    stock_u8 = (stock * 255).round().astype(np.uint8)
    assert streamed.shape == stock_u8.shape
    assert np.abs(streamed.astype(int) - stock_u8.astype(int)).max() <= 1


class FlakyVae(torch.nn.Module):
    """The real VAE, except that decoding more than `limit` frames at once raises CUDA's OOM error."""

    def __init__(self, vae: Any, limit: int):
        super().__init__()
        self.inner, self.limit, self.calls = vae, limit, []
        self.config, self.decoder = vae.config, vae.decoder

    def decode(self, z: torch.Tensor, num_frames: int) -> Any:
        self.calls.append(num_frames)
        if num_frames > self.limit:
            raise OutOfMemory("CUDA out of memory (injected)")
        return self.inner.decode(z, num_frames=num_frames)


def test_decode_halves_the_chunk_on_out_of_memory_and_keeps_going(pipe: Any) -> None:
    torch.manual_seed(2)
    latents = torch.randn(1, 8, 4, 16, 16)
    flaky, freed = FlakyVae(pipe.vae, limit=2), []
    ours, decoder = decode_all(flaky, latents, 8, free_cache=lambda: freed.append(1))
    expected, _ = decode_all(pipe.vae, latents, 2)

    assert flaky.calls == [8, 4, 2, 2, 2, 2]  # 8 fails, 4 fails, then 2 at a time to the end
    assert (decoder.chunk_size, decoder.halvings, len(freed)) == (2, 2, 2)
    assert np.array_equal(ours, expected)


def test_decode_gives_up_when_one_frame_does_not_fit(pipe: Any) -> None:
    flaky = FlakyVae(pipe.vae, limit=0)
    with pytest.raises(OutOfMemory):
        decode_all(flaky, torch.randn(1, 4, 4, 16, 16), 4, free_cache=lambda: None)
    assert flaky.calls == [4, 2, 1]


class MeteredVae(FlakyVae):
    """The real VAE, recording each decode's frames, with a device meter that sees 1 GB a frame decoded."""

    def __init__(self, vae: Any):
        super().__init__(vae, limit=1_000)
        self.high = 0

    def decode(self, z: torch.Tensor, num_frames: int) -> Any:
        self.high = max(self.high, num_frames * 10**9)
        return super().decode(z, num_frames)


class Meter:
    """profile_decode's view of device memory, for a CPU: what MeteredVae reports."""

    def __init__(self, vae: MeteredVae):
        self.vae = vae

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def allocated(self) -> int:
        return 0

    def reset_peak(self) -> None:
        self.vae.high = 0

    def peak(self) -> int:
        return self.vae.high


def test_the_decode_profile_times_the_sizes_in_turn_and_skips_what_the_budget_cannot_hold(pipe: Any) -> None:
    """Each size decodes 4 frames untimed, then once timed; the second timed round goes round the sizes again
    (on an H100 worker, one size after another ranked chunk 1 first where the bench ranked it last). Chunk 8
    would need 8 GB by the line through 1, 2 and 4: over the 5 GB budget, so it is never decoded."""
    vae = MeteredVae(pipe.vae)
    profile = profile_decode(vae, torch.device("cpu"), 64, 64, 8, (1, 2, 4, 8), budget_bytes=5e9, memory=Meter(vae))

    first_round = [1] * 8 + [2] * 4 + [4] * 2  # per size: untimed then timed, 4 frames each
    assert vae.calls == first_round + [1] * 4 + [2] * 2 + [4]
    assert profile.peak_bytes == {1: 10**9, 2: 2 * 10**9, 4: 4 * 10**9}
    assert {n: len(t) for n, t in profile.timings.items()} == {1: 2, 2: 2, 4: 2}
    assert profile.seconds_per_frame == {n: min(t) for n, t in profile.timings.items()}
    assert profile.describe().startswith("1: ") and profile.describe().count(",") == 2


# Measured-like figures: speed levels off from 8 frames, memory is 1 GB + 1 GB per frame at 1024x576.
PROFILE = DecodeProfile(
    pixels=1024 * 576,
    seconds_per_frame={1: 0.2, 2: 0.12, 4: 0.09, 8: 0.081, 16: 0.08},
    peak_bytes={1: int(2e9), 2: int(3e9), 4: int(5e9), 8: int(9e9), 16: int(17e9)},
)


def test_auto_chunk_is_the_smallest_within_five_percent_of_the_fastest() -> None:
    assert PROFILE.preferred() == 8  # 0.081 <= 0.08 * 1.05; 4 frames (0.09) is 12% slower
    assert PROFILE.preferred(tolerance=0.2) == 4
    assert PROFILE.cost(8) == pytest.approx(9e9) and PROFILE.cost(8, 512 * 288) == pytest.approx(9e9 / 4)


def test_auto_chunk_shrinks_to_the_budget_and_stays_within_the_video() -> None:
    assert PROFILE.chunk_for(budget_bytes=100e9, width=1024, height=576, num_frames=25) == 8  # no faster above 8
    assert PROFILE.chunk_for(budget_bytes=6e9, width=1024, height=576, num_frames=25) == 5  # 1 + 5 x 1 GB
    assert PROFILE.chunk_for(budget_bytes=6e9, width=512, height=288, num_frames=25) == 8  # a quarter the pixels
    assert PROFILE.chunk_for(budget_bytes=1e9, width=1024, height=576, num_frames=25) == 1  # never below 1
    assert PROFILE.chunk_for(budget_bytes=100e9, width=1024, height=576, num_frames=4) == 4  # never above the video


def test_auto_on_a_cpu_is_a_fixed_chunk(pipe: Any) -> None:
    renderer = Renderer(pipe=pipe, device=torch.device("cpu"), dtype=torch.float32)
    assert renderer.choose_decode_chunk("auto", JobParams(num_frames=25)) == 8
    assert renderer.choose_decode_chunk("auto", JobParams(num_frames=4)) == 4
    assert renderer.choose_decode_chunk(3, JobParams(num_frames=25)) == 3


def test_yuv_conversion_round_trips_through_ffmpeg() -> None:
    frames = smooth_frames(4)
    as_vae_output = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    yuv = to_yuv420p(as_vae_output)
    assert yuv.shape == (4, 48 * 64 * 3 // 2) and yuv.dtype == np.uint8
    run = subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "yuv420p",
            "-s",
            "64x48",
            "-i",
            "-",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ],
        input=yuv.tobytes(),
        capture_output=True,
        check=True,
    )
    back = np.frombuffer(run.stdout, dtype=np.uint8).reshape(frames.shape)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3.0


@pytest.mark.parametrize(("fmt", "magic"), [("mp4", b"ftyp"), ("webm", b"\x1a\x45\xdf\xa3"), ("gif", b"GIF8")])
def test_every_format_holds_every_frame(fmt: str, magic: bytes) -> None:
    frames = smooth_frames(5)
    with VideoWriter(64, 48, fps=5, fmt=fmt) as writer:
        writer.write(frames[:2])
        writer.write(frames[2:])
        data = writer.finish()
    assert magic in data[:8]
    decoded_bytes, _ = ffmpeg_decode(data, f".{fmt}")
    assert decoded_bytes == frames.nbytes


def test_mp4_is_faststart_tagged_and_takes_yuv_from_the_device() -> None:
    frames = smooth_frames(3)
    yuv = to_yuv420p(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 * 2 - 1)
    with VideoWriter(64, 48, fps=4, pix_fmt="yuv420p") as writer:
        writer.write(yuv)
        data = writer.finish()
    assert data.index(b"moov") < data.index(b"mdat")  # the index first: playable while downloading
    decoded_bytes, info = ffmpeg_decode(data, ".mp4")
    assert decoded_bytes == frames.nbytes
    assert b"yuv420p(tv, smpte170m" in info and b"4 fps" in info


def test_the_encoder_leaves_no_files_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        with VideoWriter(64, 48, fps=5) as writer:
            writer.write(smooth_frames(2))
            writer.finish()
        abandoned = VideoWriter(64, 48, fps=5)
        abandoned.write(smooth_frames(2))
        abandoned.close()  # an encode that fails halfway
    finally:
        tempfile.tempdir = None
    assert list(tmp_path.iterdir()) == []
    assert not any(
        "svdq-video" in os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


def test_the_encoder_refuses_frames_of_the_wrong_shape_and_reports_ffmpeg_errors() -> None:
    with VideoWriter(64, 48, fps=5) as writer, pytest.raises(ValueError, match="expected"):
        writer.write(np.zeros((1, 64, 48, 3), dtype=np.uint8))
    # An odd width: x264 cannot take 4:2:0 at that size, and says so.
    with pytest.raises(EncodeError, match="ffmpeg failed"), VideoWriter(63, 48, fps=5) as writer:
        writer.write(np.zeros((2, 48, 63, 3), dtype=np.uint8))
        writer.finish()


def test_closing_twice_never_closes_a_file_that_reused_the_number() -> None:
    writer = VideoWriter(64, 48, fps=5)
    writer.write(smooth_frames(2))
    writer.finish()  # closes its in-memory files
    newcomer = os.memfd_create("someone-else")  # likely takes one of the numbers just freed
    try:
        writer.close()
        writer.close()
        os.fstat(newcomer)  # still open
    finally:
        os.close(newcomer)


@pytest.mark.timeout(60)  # without the deadline, this waits for ffmpeg for ever
def test_a_wedged_encoder_is_given_up_at_the_deadline_and_killed() -> None:
    """ffmpeg frozen (SIGSTOP): neither write() nor finish() waits past the writer's deadline."""
    big = np.zeros((8, 480, 640, 3), dtype=np.uint8)  # 7 MB a chunk: more than the pipe and the queue hold
    writer = VideoWriter(640, 480, fps=5, deadline=time.monotonic() + 1.0)
    assert writer._proc is not None
    pid = writer._proc.pid
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(EncodeTimeout, match="stopped taking frames"):
        for _ in range(8):
            writer.write(big)
    assert time.monotonic() - started < 3
    writer.close()
    assert writer._proc is None and not os.path.exists(f"/proc/{pid}")  # killed and reaped

    writer = VideoWriter(64, 48, fps=5, deadline=time.monotonic() + 0.5)
    writer.write(smooth_frames(2))
    assert writer._proc is not None
    os.kill(writer._proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(EncodeTimeout, match="was still encoding"):
        writer.finish()
    assert time.monotonic() - started < 2
    assert writer._proc is None  # finish() closed it: ffmpeg killed and reaped

    # Within its deadline a writer works as before.
    writer = VideoWriter(64, 48, fps=5, deadline=time.monotonic() + 60)
    writer.write(smooth_frames(2))
    assert writer.finish()[4:8] == b"ftyp"


def test_an_encoder_past_its_deadline_fails_the_job_timeout_not_internal() -> None:
    error = error_of("job", EncodeTimeout("was still encoding"))
    assert error["code"] == "timeout", error
    assert error["message"].startswith("the attempt ran past the job's time limit (SVDQ_JOB_TIMEOUT on its worker)")
    assert "the encoder (ffmpeg) was still encoding" in error["message"]
