"""Full-size SVD-XT, random weights: warm seconds per video per stage and peak VRAM, stock against svdq.

The architecture is SVD-XT's (diffusers' default UNetSpatioTemporalConditionModel, SVD's VAE, a
ViT-H/14-sized CLIP vision tower), built on the GPU with random weights: no download. fp16, 25 frames,
576x1024, 25 steps. In one process, in this order (svdq's settings change the pipeline):
  stock:          pipe(image, decode_chunk_size=8) then export_to_video, the diffusers way
  svdq:           worker.video.start_video + finish: latents, streamed chunked decode, YUV on the GPU, encoder
  svdq+compile:   the same with the UNet under torch.compile
Each is run once to warm up, then `--repeat` times. One JSON line per figure.

Run on a GPU: `python bench/gpu_svd.py`; on a CPU, the same code with the tiny model: `--small`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from producer.contract import JobParams
from worker.pipeline import Renderer, tune_for_gpu, warm_up
from worker.settings import WorkerSettings
from worker.video import start_video


def build_full_svd_xt(device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from worker.tiny_model import build_tiny_pipeline

    scheduler: EulerDiscreteScheduler = build_tiny_pipeline().scheduler  # SVD-XT's scheduler config
    with device:  # allocate straight on the GPU: 2.3B parameters initialised on a CPU take minutes
        unet = UNetSpatioTemporalConditionModel()  # the defaults are SVD-XT's UNet
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        )
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=1280,
                num_hidden_layers=32,
                num_attention_heads=16,
                patch_size=14,
                image_size=224,
                projection_dim=1024,
                intermediate_size=5120,
            )
        )
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )  # fmt: skip
    return pipe.to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_stock(pipe: Any, image: Image.Image, params: JobParams, chunk: int | None, device: torch.device) -> dict:
    from diffusers.utils import export_to_video

    marks: list[float] = []

    def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if step + 1 == params.num_inference_steps:
            sync(device)
            marks.append(time.perf_counter())
        return tensors

    peak_reset(device)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        generator = torch.Generator("cpu").manual_seed(0)
        frames = pipe(image, width=params.width, height=params.height, num_frames=params.num_frames,
                      num_inference_steps=params.num_inference_steps, decode_chunk_size=chunk,
                      generator=generator, callback_on_step_end=on_step).frames[0]  # fmt: skip
    decoded = time.perf_counter()
    path = export_to_video(frames, tempfile.mktemp(suffix=".mp4"), fps=params.fps)
    with open(path, "rb") as fh:
        size = len(fh.read())
    os.unlink(path)
    done = time.perf_counter()
    return {"denoise": marks[-1] - started, "decode": decoded - marks[-1], "encode": done - decoded,
            "total": done - started, "bytes": size, "peak_vram_gib": peak_gib(device)}  # fmt: skip


def run_svdq(renderer: Renderer, image: Image.Image, params: JobParams, settings: WorkerSettings) -> dict:
    peak_reset(renderer.device)
    timings: dict[str, float] = {}
    memory: dict[str, Any] = {}
    started = time.perf_counter()
    pending = start_video(renderer, image, params, 0, settings, timings=timings, memory=memory)
    try:
        video = pending.finish()
    finally:
        pending.close()
    total = time.perf_counter() - started
    return {**timings, "total": total, "bytes": len(video.data), "peak_vram_gib": peak_gib(renderer.device),
            "decode_chunk_size": memory["decode_chunk_size"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model, 64x64, 4 frames, 2 steps (a CPU is fine)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--stock-chunk", type=int, default=8, help="decode_chunk_size for the stock path")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.small:
        from worker.tiny_model import build_tiny_pipeline

        pipe = build_tiny_pipeline().to(device=device, dtype=dtype)
        params = JobParams(width=64, height=64, num_frames=4, num_inference_steps=2)
    else:
        pipe = build_full_svd_xt(device, dtype)
        params = JobParams(width=1024, height=576, num_frames=25, num_inference_steps=25)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (params.width, params.height), (180, 120, 60))
    settings = WorkerSettings(decode_chunk_size="auto")
    common = {"bench": "gpu_svd", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "machine": platform.node(), "model": "tiny" if args.small else "SVD-XT architecture, random weights",
              "size": f"{params.width}x{params.height}", "frames": params.num_frames,
              "steps": params.num_inference_steps, "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip

    def report(path: str, runs: list[dict]) -> dict:
        figures = {key: statistics.median(r[key] for r in runs) for key in runs[0] if runs[0][key] is not None}
        for figure, value in figures.items():
            print(json.dumps({**common, "path": path, "figure": figure, "value": round(value, 3)}), flush=True)
        return figures

    # 1. Stock diffusers, untouched pipeline.
    run_stock(pipe, image, params, args.stock_chunk, device)  # warm-up
    stock = report(f"stock decode_chunk_size={args.stock_chunk}",
                   [run_stock(pipe, image, params, args.stock_chunk, device) for _ in range(args.repeat)])  # fmt: skip

    # 2. svdq: the worker's GPU settings, warm-up and decode-cost measurement, then its render path.
    if device.type == "cuda":
        tune_for_gpu(pipe, compile_unet=False)
    renderer = Renderer(pipe=pipe, device=device, dtype=dtype)
    warm_up(renderer)
    results = {"svdq": report("svdq", [run_svdq(renderer, image, params, settings) for _ in range(args.repeat)])}

    # 3. svdq with the UNet compiled.
    if not args.no_compile and device.type == "cuda":
        started = time.perf_counter()
        pipe.unet = torch.compile(pipe.unet)
        warm_up(renderer)
        print(json.dumps({**common, "path": "svdq+compile", "figure": "compile_seconds",
                          "value": round(time.perf_counter() - started, 1)}), flush=True)  # fmt: skip
        runs = [run_svdq(renderer, image, params, settings) for _ in range(args.repeat)]
        results["svdq+compile"] = report("svdq+compile", runs)

    for path, figures in results.items():
        print(json.dumps({**common, "path": path, "figure": "speedup_vs_stock",
                          "value": round(stock["total"] / figures["total"], 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
