"""Peak memory of decode + encode for 14, 25 and 50 frames: svdq's streamed path against the stock one.

svdq: latents, then `decode_chunk_size` frames at a time converted on the device and streamed into the
encoder. Stock: `pipe(..., decode_chunk_size=N)` and with diffusers' default `None` (every frame at
once), then `export_to_video`. Each configuration runs in a fresh process. On a CPU it uses SVD's
full-size VAE with random weights (`svdq make-tiny-model --full-vae`) at a small resolution and reads
the kernel's peak RSS; on CUDA, `torch.cuda.max_memory_allocated`.

Run: `.venv/bin/python bench/decode_memory.py [--frames 14 25 50] [--chunk 4] [--size 128]`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_DIR = Path.home() / ".cache" / "svdq" / "bench" / "tiny-full-vae"


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def one(path: str, frames: int, chunk: int | None, size: int, model: str) -> dict[str, float]:
    """Run one configuration in this process and return its memory figures."""
    import worker  # noqa: F401  (before diffusers: its filter of transformers' torchvision advice)

    # isort: split
    import torch
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import export_to_video
    from PIL import Image

    from producer.contract import JobParams
    from worker.decode import ChunkedDecoder, to_yuv420p
    from worker.encode import VideoWriter
    from worker.pipeline import Renderer, resolve_device

    device = resolve_device("auto")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableVideoDiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (size, size), (200, 120, 60))
    common = {"width": size, "height": size, "num_frames": frames, "num_inference_steps": 1}
    on_gpu = device.type == "cuda"
    started = time.perf_counter()
    if path == "svdq":
        renderer = Renderer(pipe=pipe, device=device, dtype=dtype)
        latents = renderer.denoise(image, JobParams(**common), seed=0, on_step=lambda d, t: None)
        reset_peak_rss()
        base = rss_mib("VmRSS")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with VideoWriter(size, size, 7, pix_fmt="yuv420p") as writer:
            for part in ChunkedDecoder(pipe.vae, latents, chunk or frames):
                writer.write(to_yuv420p(part))
            writer.finish()
    else:
        # The stock pipeline decodes inside __call__: its decode peak is the call's peak above the
        # memory at the end of denoising, which we cannot reach from outside, so report the whole call.
        reset_peak_rss()
        base = rss_mib("VmRSS")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            video = pipe(
                image, decode_chunk_size=chunk, generator=torch.Generator("cpu").manual_seed(0), **common
            ).frames[0]
        out = export_to_video(video, tempfile.mktemp(suffix=".mp4"), fps=7)
        os.unlink(out)
    figures = {
        "peak_rss_mib": _process_peak_mib(),
        "stage_peak_above_start_mib": rss_mib("VmHWM") - base,
        "seconds": time.perf_counter() - started,
    }
    if on_gpu:
        figures["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def _process_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole life, never reset


def ensure_model() -> str:
    if not (MODEL_DIR / "model_index.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "worker.tiny_model", str(MODEL_DIR), "--full-vae"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return str(MODEL_DIR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[14, 25, 50])
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--model", help="a pipeline folder (default: the tiny model with SVD's full VAE)")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "FRAMES", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model or ensure_model()

    if args.one:  # a child: one configuration, one line of figures
        path, frames, chunk = args.one[0], int(args.one[1]), None if args.one[2] == "none" else int(args.one[2])
        print(json.dumps(one(path, frames, chunk, args.size, model)))
        return

    common = {
        "bench": "decode_memory",
        "size": f"{args.size}x{args.size}",
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "model": "tiny UNet + CLIP, SVD's full VAE, random weights",
    }
    peaks: dict[tuple[str, int], float] = {}
    for frames in args.frames:
        for path, chunk in [("svdq", str(args.chunk)), ("stock", str(args.chunk)), ("stock", "none")]:
            cmd = [
                sys.executable,
                __file__,
                "--model",
                model,
                "--size",
                str(args.size),
                "--one",
                path,
                str(frames),
                chunk,
            ]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            label = f"{path} decode_chunk_size={chunk}"
            peaks[(label, frames)] = figures["peak_rss_mib"]
            for figure, value in figures.items():
                print(
                    json.dumps({**common, "path": label, "frames": frames, "figure": figure, "value": round(value, 1)}),
                    flush=True,
                )
    lo, hi = min(args.frames), max(args.frames)
    for label in {label for label, _ in peaks}:
        print(
            json.dumps(
                {
                    **common,
                    "path": label,
                    "figure": f"peak_ratio_{hi}_over_{lo}_frames",
                    "value": round(peaks[(label, hi)] / peaks[(label, lo)], 3),
                }
            )
        )
    ours = f"svdq decode_chunk_size={args.chunk}"
    for stock_label in (f"stock decode_chunk_size={args.chunk}", "stock decode_chunk_size=none"):
        print(
            json.dumps(
                {
                    **common,
                    "path": ours,
                    "figure": f"peak_ratio_vs_{stock_label.replace(' ', '_')}",
                    "frames": hi,
                    "value": round(peaks[(ours, hi)] / peaks[(stock_label, hi)], 3),
                }
            )
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
