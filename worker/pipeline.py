"""Load StableVideoDiffusionPipeline once per worker process and run it to latents.

Decoding is not done here: the pipeline stops at latents (`output_type="latent"`) so the worker can
decode in chunks and stream frames to the encoder (see worker.decode).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from producer.contract import JobParams
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"SVDQ_DTYPE={name!r} is not a torch dtype (try float16, bfloat16, float32)")
    return dtype


@dataclass
class Renderer:
    pipe: Any  # diffusers.StableVideoDiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    load_seconds: float

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    def denoise(
        self, image: Image.Image, params: JobParams, seed: int, on_step: StepCallback
    ) -> torch.Tensor:
        """Run the pipeline up to latents, shaped (1, frames, 4, height/f, width/f)."""

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step + 1, params.num_inference_steps)
            return tensors

        # A CPU generator gives the same noise for a seed on every device.
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.inference_mode():
            out = self.pipe(
                image,
                height=params.height,
                width=params.width,
                num_frames=params.num_frames,
                num_inference_steps=params.num_inference_steps,
                fps=params.fps,
                motion_bucket_id=params.motion_bucket_id,
                noise_aug_strength=params.noise_aug_strength,
                min_guidance_scale=params.min_guidance_scale,
                max_guidance_scale=params.max_guidance_scale,
                generator=generator,
                output_type="latent",
                callback_on_step_end=callback,
            )
        return out.frames


def _dtype_kwarg() -> str:
    """`dtype` on diffusers that renamed `torch_dtype` (the old name warns), `torch_dtype` before that."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def load_renderer(settings: WorkerSettings) -> Renderer:
    import transformers
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    # Progress bars from loading would flood the worker's log with carriage returns.
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    started = time.perf_counter()
    kwargs = {_dtype_kwarg(): dtype, "variant": settings.model_variant}
    pipe = StableVideoDiffusionPipeline.from_pretrained(settings.model, **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    seconds = time.perf_counter() - started
    log.info("loaded %s on %s (%s) in %.1fs", settings.model, device, dtype, seconds)
    return Renderer(pipe=pipe, device=device, dtype=dtype, load_seconds=seconds)
