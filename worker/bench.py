"""`svdq bench`: stock diffusers against svdq's paths on this machine's GPU and model, in one process.

Paths, in this order (each later one changes the pipeline the earlier ones used untouched):
  stock     pipe(image, decode_chunk_size=8) then diffusers' export_to_video: what users of diffusers run
  svdq      the worker's defaults: tuned, compiled on CUDA (cold start and compile seconds reported), auto chunk
  eager     svdq's render path without torch.compile (--paths eager; off by default)
  lowvram   SVDQ_LOW_VRAM=1: split feed-forward, model CPU offload, decode chunks of 1-2 (uncompiled here)
Each path is warmed up first (one step at the same size), then timed `--repeat` times; the median is reported.
`--json` prints one JSON line per figure (what bench/gpu_svd.py and docs/PERFORMANCE.md use), else a table.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from producer.contract import JobParams
from worker import compile_cache
from worker.pipeline import Renderer, resolve_device, tune_options, warm_up
from worker.settings import WorkerSettings
from worker.tuning import attention_shapes, compile_seconds, compiler_stance, disable_low_vram, tune
from worker.video import start_video

PATHS = ("stock", "svdq", "eager", "lowvram")
# Variants re-measured on the svdq path's compiled pipeline (no recompile): `--variants cudnn_benchmark`.
VARIANTS = ("cudnn_benchmark", "vae_compile")


def build_full_svd_xt(device: torch.device, dtype: torch.dtype) -> Any:
    """SVD-XT's architecture with random weights, built on `device`: the real model's cost, no download."""
    from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from worker.tiny_model import build_tiny_pipeline, svd_vae

    scheduler = build_tiny_pipeline().scheduler  # SVD-XT's scheduler config
    with device:  # allocate straight on the GPU: 2.3B parameters initialised on a CPU take minutes
        unet = UNetSpatioTemporalConditionModel()  # the defaults are SVD-XT's UNet
        vae = svd_vae()
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
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )
    return pipe.to(device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_stock(pipe: Any, image: Image.Image, params: JobParams, chunk: int, device: torch.device) -> dict:
    from diffusers.utils import export_to_video

    marks: list[float] = []

    def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if step + 1 == params.num_inference_steps:
            _sync(device)
            marks.append(time.perf_counter())
        return tensors

    _peak_reset(device)
    _sync(device)
    started = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.inference_mode():
        frames = pipe(
            image,
            width=params.width,
            height=params.height,
            num_frames=params.num_frames,
            num_inference_steps=params.num_inference_steps,
            decode_chunk_size=chunk,
            generator=generator,
            callback_on_step_end=on_step,
        ).frames[0]
    decoded = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        size = Path(export_to_video(frames, str(Path(tmp) / "stock.mp4"), fps=params.fps)).stat().st_size
    done = time.perf_counter()
    return {
        "total": done - started,
        "denoise": marks[-1] - started,
        "decode": decoded - marks[-1],
        "encode": done - decoded,
        "bytes": size,
        "peak_vram_gib": _peak_gib(device),
        "decode_chunk_size": chunk,
    }


def run_svdq(renderer: Renderer, image: Image.Image, params: JobParams, settings: WorkerSettings) -> dict:
    _peak_reset(renderer.device)
    timings: dict[str, float] = {}
    memory: dict[str, Any] = {}
    started = time.perf_counter()
    # A job's checkpoints as a worker runs them (its cancel check reads Redis at most every 0.25 s: left out), so
    # the figure includes what they cost: on CUDA, the host kept two layers ahead of the device.
    checks: list[None] = []
    pending = start_video(
        renderer, image, params, 0, settings, timings=timings, memory=memory, checkpoint=lambda: checks.append(None)
    )
    try:
        video = pending.finish()
    finally:
        pending.close()
    return {
        "total": time.perf_counter() - started,
        **timings,
        "bytes": len(video.data),
        "peak_vram_gib": _peak_gib(renderer.device),
        "decode_chunk_size": memory["decode_chunk_size"],
        "checkpoints": len(checks),
    }


class Report:
    """Collects figures per path; prints JSON lines as they come (--json) or a table at the end."""

    def __init__(self, common: dict[str, Any], as_json: bool):
        self.common, self.as_json = common, as_json
        self.rows: dict[str, dict[str, float]] = {}

    def figure(self, path: str, figure: str, value: float, **extra: Any) -> None:
        self.rows.setdefault(path, {})[figure] = value
        if self.as_json:
            print(
                json.dumps({**self.common, "path": path, "figure": figure, "value": round(value, 3), **extra}),
                flush=True,
            )

    def runs(self, path: str, runs: list[dict]) -> dict[str, float]:
        for key in runs[0]:
            if runs[0][key] is not None:
                self.figure(path, key, statistics.median(r[key] for r in runs))
        return self.rows[path]

    def table(self) -> str:
        cols = [
            ("total", "total s"),
            ("denoise", "denoise"),
            ("compile", "compile"),
            ("decode", "decode"),
            ("encode", "encode"),
            ("peak_vram_gib", "peak GiB"),
            ("decode_chunk_size", "chunk"),
            ("speedup_vs_stock", "vs stock"),
            ("cold_start_seconds", "start s"),
        ]
        lines = [
            f"{self.common['device']}, {self.common['model']} (loaded in {self.rows['load']['seconds']:.1f}s), "
            f"{self.common['size']}, "
            f"{self.common['frames']} frames, {self.common['steps']} steps, {self.common['dtype']}",
            f"{'path':<10}" + "".join(f"{title:>10}" for _, title in cols),
        ]
        for path, row in self.rows.items():
            if path == "load":
                continue
            cells = "".join(f"{row[key]:>10.2f}" if key in row else f"{'-':>10}" for key, _ in cols)
            lines.append(f"{path:<10}{cells}")
        return "\n".join(lines)


def load_pipeline(args: argparse.Namespace, settings: WorkerSettings, device: torch.device, dtype: torch.dtype) -> Any:
    if args.small:
        from worker.tiny_model import build_tiny_pipeline

        return build_tiny_pipeline().to(device=device, dtype=dtype)
    if args.random_weights:
        return build_full_svd_xt(device, dtype)
    from diffusers import StableVideoDiffusionPipeline

    from worker.pipeline import _dtype_kwarg

    kwargs = {_dtype_kwarg(): dtype, "variant": settings.model_variant}
    return StableVideoDiffusionPipeline.from_pretrained(args.model or settings.model, **kwargs).to(device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="svdq bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="hub id or local folder (default: SVDQ_MODEL)")
    parser.add_argument("--random-weights", action="store_true", help="SVD-XT's architecture, random weights")
    parser.add_argument("--small", action="store_true", help="the tiny model at 64x64, 4 frames, 2 steps (CPU)")
    parser.add_argument("--frames", type=int, help="frames per video, 1 to 128 (default: 25; --small: 4)")
    parser.add_argument("--steps", type=int, help="denoising steps, 1 to 200 (default: 25; --small: 2)")
    parser.add_argument("--width", type=int, help="64 to 2048, a multiple of 8 (default: 1024; --small: 64)")
    parser.add_argument("--height", type=int, help="64 to 2048, a multiple of 8 (default: 576; --small: 64)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per path after its warm-up (default: 1)")
    parser.add_argument(
        "--paths", default="stock,svdq,lowvram", help=f"comma list of {', '.join(PATHS)} (default: stock,svdq,lowvram)"
    )
    parser.add_argument("--stock-chunk", type=int, default=8, help="decode_chunk_size of the stock path (default: 8)")
    parser.add_argument("--json", action="store_true", help="one JSON line per figure")
    parser.add_argument("--variants", default="", help=f"after the svdq path, on its pipeline: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the svdq path: the N kernels taking the most device time in a denoise step",
    )
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    if unknown := set(args.paths) - set(PATHS):
        parser.error(f"--paths: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PATHS)})")
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    return args


def bench_path(
    report: Report,
    path: str,
    pipe: Any,
    image: Image.Image,
    params: JobParams,
    settings: WorkerSettings,
    device: torch.device,
    dtype: torch.dtype,
    repeat: int,
) -> Renderer:
    """One of svdq's paths: tune the pipeline as a worker would, warm up (cold start), then the timed runs."""
    options = tune_options(settings, device)
    options = replace(
        options,
        compile=options.compile and path == "svdq",
        compile_vae=options.compile_vae and path == "svdq",
        low_vram=path == "lowvram",
    )
    if options.compile:
        compile_cache.load_artifacts(
            compile_cache.configure(Path(settings.compile_cache_dir or compile_cache.default_cache_dir()))
        )
    started, compiled = time.perf_counter(), compile_seconds()
    renderer = Renderer(pipe=pipe, device=device, dtype=dtype)
    shapes = attention_shapes(pipe.unet, params.width, params.height, params.num_frames, renderer.vae_scale_factor)
    renderer.tuned = tune(pipe, device, dtype, options, shapes)
    one_step = params.model_copy(update={"num_inference_steps": 1})
    warm_up(renderer, settings.max_vram_gib, [one_step] if options.compile else [])  # compiles the bench's shape
    run_svdq(renderer, image, one_step, settings)
    report.figure(path, "cold_start_seconds", time.perf_counter() - started, attention=renderer.tuned.attention)
    if renderer.tuned.compiled_regions:
        report.figure(path, "compile_seconds", compile_seconds() - compiled)
    for backend, seconds in (renderer.tuned.attention_timings or {}).items():
        report.figure(path, f"attention_{backend}_ms", seconds * 1000)
    if (profile := renderer.decode_profile) is not None:  # what the auto chunk was chosen from
        report.figure(path, "denoise_peak_gib", renderer.denoise_peak_bytes / 2**30)
        report.figure(path, "budget_gib", (renderer.budget_bytes or 0) / 2**30)
        for n, seconds in profile.seconds_per_frame.items():
            runs = [round(t * 1000, 2) for t in profile.timings.get(n, ())]
            report.figure(path, f"decode_ms_per_frame_chunk{n}", seconds * 1000, runs_ms=runs)
            report.figure(path, f"decode_gib_chunk{n}", profile.peak_bytes[n] / 2**30)
    figures = report.runs(path, [run_svdq(renderer, image, params, settings) for _ in range(repeat)])
    if "stock" in report.rows:
        report.figure(path, "speedup_vs_stock", report.rows["stock"]["total"] / figures["total"])
        if figures.get("peak_vram_gib"):
            report.figure(path, "vram_vs_stock", figures["peak_vram_gib"] / report.rows["stock"]["peak_vram_gib"])
    if options.low_vram:
        disable_low_vram(pipe, device)
    return renderer


def bench_variant(
    report: Report,
    variant: str,
    renderer: Renderer,
    image: Image.Image,
    params: JobParams,
    settings: WorkerSettings,
    repeat: int,
) -> None:
    """A setting measured on the svdq path's warm renderer, then undone."""
    if variant == "vae_compile":
        bench_vae_compile(report, renderer, params, settings.compile_backend)
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms per conv shape at the first call
    try:
        run_svdq(renderer, image, params.model_copy(update={"num_inference_steps": 1}), settings)
        figures = report.runs(f"svdq_{variant}", [run_svdq(renderer, image, params, settings) for _ in range(repeat)])
        if "stock" in report.rows:
            report.figure(f"svdq_{variant}", "speedup_vs_stock", report.rows["stock"]["total"] / figures["total"])
    finally:
        torch.backends.cudnn.benchmark = before


def _decode_seconds_per_frame(renderer: Renderer, params: JobParams, chunk: int) -> float:
    from worker.decode import ChunkedDecoder

    scale = renderer.vae_scale_factor
    latent = torch.zeros(
        1,
        chunk,
        renderer.vae.config.latent_channels,
        params.height // scale,
        params.width // scale,
        device=renderer.device,
        dtype=renderer.dtype,
    )
    for _ in ChunkedDecoder(renderer.vae, latent, chunk):  # kernels chosen (or compiled) here
        pass
    renderer.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        for _ in ChunkedDecoder(renderer.vae, latent, chunk):
            pass
    renderer.synchronize()
    return (time.perf_counter() - started) / (3 * chunk)


def bench_vae_compile(report: Report, renderer: Renderer, params: JobParams, backend: str, chunk: int = 4) -> None:
    """What compiling the VAE's decoder gives: ms per frame at one chunk size, eager then compiled."""
    decoder, was_compiled = renderer.vae.decoder, renderer.tuned.compiled_vae
    with torch.inference_mode():
        with compiler_stance("force_eager"):
            eager = _decode_seconds_per_frame(renderer, params, chunk)
        compiled_before, started = compile_seconds(), time.perf_counter()
        if not was_compiled:
            decoder.compile(backend=backend)
        try:
            with compiler_stance("default"):
                compiled = _decode_seconds_per_frame(renderer, params, chunk)
            report.figure("vae_compile", "first_decode_seconds", time.perf_counter() - started)
        finally:
            if not was_compiled:
                decoder._compiled_call_impl = None  # back to eager (Module.compile keeps its wrapper there)
    report.figure("vae_compile", f"decode_ms_per_frame_chunk{chunk}_eager", eager * 1000)
    report.figure("vae_compile", f"decode_ms_per_frame_chunk{chunk}_compiled", compiled * 1000)
    report.figure("vae_compile", "compile_seconds", compile_seconds() - compiled_before)


def profile_step(report: Report, renderer: Renderer, image: Image.Image, params: JobParams, top: int) -> None:
    """Where one denoise step's device time goes: the `top` kernels, and the total."""
    from torch.profiler import ProfilerActivity, profile

    one_step = params.model_copy(update={"num_inference_steps": 1})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if renderer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        renderer.denoise(image, one_step, seed=0, on_step=lambda done, total: None)
        renderer.synchronize()
    averages = list(prof.key_averages())
    events = [e for e in averages if getattr(getattr(e, "device_type", None), "name", "") == "CUDA"] or averages

    def self_time(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cpu_time_total", 0))

    total = sum(self_time(e) for e in events)
    report.figure("profile", "device_ms_per_step", total / 1000)
    for event in sorted(events, key=self_time, reverse=True)[:top]:
        report.figure("profile", "kernel_ms", self_time(event) / 1000, kernel=event.key[:160], calls=event.count)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = WorkerSettings(decode_chunk_size="auto")
    device = resolve_device(settings.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    small = JobParams(width=64, height=64, num_frames=4, num_inference_steps=2)
    base = small if args.small else JobParams()
    params = JobParams(
        width=args.width or base.width,
        height=args.height or base.height,
        num_frames=args.frames or base.num_frames,
        num_inference_steps=args.steps or base.num_inference_steps,
    )
    model = (
        "tiny"
        if args.small
        else "SVD-XT architecture, random weights"
        if args.random_weights
        else (args.model or settings.model)
    )
    report = Report(
        {
            "bench": "gpu_svd",
            "machine": platform.node(),
            "model": model,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "size": f"{params.width}x{params.height}",
            "frames": params.num_frames,
            "steps": params.num_inference_steps,
            "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__,
        },
        args.json,
    )
    started = time.perf_counter()
    pipe = load_pipeline(args, settings, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    report.figure("load", "seconds", time.perf_counter() - started)
    image = Image.new("RGB", (params.width, params.height), (180, 120, 60))

    # 1. Stock diffusers, untouched.
    if "stock" in args.paths:
        run_stock(pipe, image, params.model_copy(update={"num_inference_steps": 1}), args.stock_chunk, device)
        report.runs("stock", [run_stock(pipe, image, params, args.stock_chunk, device) for _ in range(args.repeat)])

    # 2-4. svdq's paths, each tuning the same pipeline further.
    for path in [p for p in PATHS[1:] if p in args.paths]:
        renderer = bench_path(report, path, pipe, image, params, settings, device, dtype, args.repeat)
        if path == "svdq":
            for variant in args.variants:
                bench_variant(report, variant, renderer, image, params, settings, args.repeat)
            if args.profile:
                profile_step(report, renderer, image, params, args.profile)
    if not args.json:
        print(report.table())
    sys.stdout.flush()
    os._exit(0)  # compile workers and offload hooks can hold the interpreter's exit for a long time


if __name__ == "__main__":
    main()
