"""Chunked decode against diffusers' own decode, and the mp4 writer (tiny model, in process)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from worker.decode import decode_chunks
from worker.encode import Mp4Writer
from worker.tiny_model import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe():  # type: ignore[no-untyped-def]
    return build_tiny_pipeline()


@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_chunked_decode_matches_the_pipelines_decode(pipe, chunk: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    latents = torch.randn(1, 6, 4, 16, 16)
    ours = np.concatenate(list(decode_chunks(pipe.vae, latents, chunk)))
    with torch.no_grad():
        decoded = pipe.decode_latents(latents, num_frames=6, decode_chunk_size=chunk)
    stock = pipe.video_processor.postprocess_video(video=decoded, output_type="pil")[0]
    assert ours.shape == (6, 32, 32, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, np.stack([np.asarray(frame) for frame in stock]))


def test_mp4_writer_writes_every_frame_and_leaves_nothing_behind(tmp_path: Path) -> None:
    before = set(Path(tempfile.gettempdir()).glob("svdq-encode-*"))
    frames = np.zeros((5, 48, 64, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(5, dtype=np.uint8)[:, None, None] * 40
    with Mp4Writer(64, 48, fps=5) as writer:
        writer.write(frames[:2])
        writer.write(frames[2:])
        data = writer.finish()
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 5
    assert data[4:8] == b"ftyp"
    # faststart: the index (moov) comes before the media data (mdat).
    assert data.index(b"moov") < data.index(b"mdat")
    assert set(Path(tempfile.gettempdir()).glob("svdq-encode-*")) == before


def test_mp4_writer_refuses_frames_of_the_wrong_shape() -> None:
    with Mp4Writer(64, 48, fps=5) as writer, pytest.raises(ValueError, match="expected"):
        writer.write(np.zeros((1, 64, 48, 3), dtype=np.uint8))
