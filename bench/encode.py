"""Encode 25 frames of 1024x576 smooth synthetic motion: svdq's encoder against diffusers' export_to_video.

One JSON line per figure. Run: `.venv/bin/python bench/encode.py [--repeat 5] [--preset P --crf N ...]`.
The stock path gets what the pipeline hands it by default (a list of PIL images) and its file is read
back and deleted, as an uploader would. svdq's path gets what its decode hands the encoder in the
worker: YUV 4:2:0 planes, converted on the device (on a GPU that conversion is a few microseconds of
the decode, so it is done before the clock starts); `speedup_rgb_input` is the same encoder fed RGB,
where ffmpeg converts on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from PIL import Image


def synthetic_frames(n: int = 25, width: int = 1024, height: int = 576, seed: int = 0) -> np.ndarray:
    """A slow camera pan over a textured landscape with a drifting sun: smooth motion, photo-like detail.

    The texture is random noise at several scales, upsampled smoothly, so it compresses like a
    photograph rather than like noise (which no encoder can shrink) or a flat gradient (which any can).
    """
    rng = np.random.default_rng(seed)
    pan_w, pan_h = width + 4 * n, height + 2 * n
    scene = np.zeros((pan_h, pan_w, 3), dtype=np.float32)
    for scale, weight in [(64, 0.55), (16, 0.3), (4, 0.15)]:
        small = rng.random((pan_h // scale + 2, pan_w // scale + 2, 3), dtype=np.float32)
        big = Image.fromarray((small * 255).astype(np.uint8)).resize((pan_w, pan_h), Image.BICUBIC)
        scene += weight * np.asarray(big, dtype=np.float32)
    y = np.arange(pan_h, dtype=np.float32)[:, None, None] / pan_h
    scene = scene * (0.6 + 0.4 * y) + np.array([40, 20, 0], dtype=np.float32) * (1 - y)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for t in range(n):
        view = scene[2 * t : 2 * t + height, 4 * t : 4 * t + width].copy()
        sun = (xx - width * (0.3 + 0.3 * t / n)) ** 2 + (yy - height * 0.3) ** 2 < (height * 0.07) ** 2
        view[sun] = (255, 225, 120)
        frames[t] = np.clip(view, 0, 255).astype(np.uint8)
    return frames


def stock(frames: np.ndarray, fps: int) -> tuple[float, bytes]:
    from diffusers.utils import export_to_video

    pil = [Image.fromarray(f) for f in frames]  # what StableVideoDiffusionPipeline returns by default
    started = time.perf_counter()
    path = export_to_video(pil, tempfile.mktemp(suffix=".mp4"), fps=fps)
    with open(path, "rb") as fh:
        data = fh.read()
    os.unlink(path)
    return time.perf_counter() - started, data


def device_yuv(frames: np.ndarray) -> np.ndarray:
    import torch

    from worker.decode import to_yuv420p

    return to_yuv420p(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1)


def svdq(frames: np.ndarray, fps: int, fmt: str, args: argparse.Namespace, chunk: int = 8) -> tuple[float, int]:
    from worker.encode import VideoWriter

    pix_fmt = "rgb24" if frames.ndim == 4 else "yuv420p"
    height, width = (frames.shape[1], frames.shape[2]) if frames.ndim == 4 else (576, 1024)
    started = time.perf_counter()
    with VideoWriter(
        width, height, fps, fmt=fmt, pix_fmt=pix_fmt, crf=args.crf, preset=args.preset, x264_params=args.x264_params
    ) as writer:
        for i in range(0, len(frames), chunk):
            writer.write(frames[i : i + chunk])
        data = writer.finish()
    return time.perf_counter() - started, data


def psnr(video: bytes, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio of the decoded video against the frames that went in, in dB."""
    import subprocess

    import imageio_ffmpeg

    with tempfile.NamedTemporaryFile(suffix=".mp4") as fh:  # the stock file has its index last: not pipeable
        fh.write(video)
        fh.flush()
        decoded = subprocess.run(
            [
                imageio_ffmpeg.get_ffmpeg_exe(),
                "-loglevel",
                "error",
                "-i",
                fh.name,
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "pipe:1",
            ],
            capture_output=True,
            check=True,
        ).stdout
    frames = np.frombuffer(decoded, dtype=np.uint8).reshape(reference.shape).astype(np.float64)
    mse = np.mean((frames - reference.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def main() -> None:
    from worker.settings import WorkerSettings

    defaults = WorkerSettings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--preset", default=defaults.x264_preset)
    parser.add_argument("--crf", type=int, default=defaults.x264_crf)
    parser.add_argument("--x264-params", default=defaults.x264_params)
    parser.add_argument("--format", default="mp4", choices=["mp4", "webm", "gif"])
    args = parser.parse_args()

    frames = synthetic_frames(args.frames)
    planes = device_yuv(frames)
    stock(frames[:2], 7), svdq(frames[:2], 7, args.format, args)  # warm the caches
    stock_runs, ours_runs, rgb_runs = [], [], []
    for _ in range(args.repeat):  # interleaved, so a busy moment hits all three alike
        stock_runs.append(stock(frames, 7))
        ours_runs.append(svdq(planes, 7, args.format, args))
        rgb_runs.append(svdq(frames, 7, args.format, args))
    stock_s, ours_s, rgb_s = (statistics.median(t for t, _ in runs) for runs in (stock_runs, ours_runs, rgb_runs))
    stock_b, ours_b = len(stock_runs[0][1]), len(ours_runs[0][1])
    common = {
        "bench": "encode",
        "frames": args.frames,
        "size": "1024x576",
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "stock": "export_to_video (libx264 medium, quality 5)",
        "svdq": f"{args.format} preset={args.preset} crf={args.crf} x264-params={args.x264_params}",
    }
    for figure, value in [
        ("stock_seconds", stock_s),
        ("svdq_seconds", ours_s),
        ("speedup", stock_s / ours_s),
        ("speedup_rgb_input", stock_s / rgb_s),
        ("stock_bytes", stock_b),
        ("svdq_bytes", ours_b),
        ("size_ratio", ours_b / stock_b),
    ]:
        print(json.dumps({**common, "figure": figure, "value": round(value, 4)}))
    if args.format == "mp4":
        for figure, data in [("stock_psnr_db", stock_runs[0][1]), ("svdq_psnr_db", ours_runs[0][1])]:
            print(json.dumps({**common, "figure": figure, "value": round(psnr(data, frames), 2)}))


if __name__ == "__main__":
    main()
