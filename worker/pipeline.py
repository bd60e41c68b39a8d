"""Load StableVideoDiffusionPipeline once per worker process, keep it warm, run it to latents.

Decoding is not done here: the pipeline stops at latents (`output_type="latent"`) so the worker can
decode in chunks and stream frames to the encoder (see worker.decode).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from producer.contract import JobParams
from worker.decode import CPU_DECODE_CHUNK, DecodeCost, OutOfMemory, free_device_memory, measure_decode_cost
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
    load_seconds: float = 0.0
    decode_cost: DecodeCost | None = None  # measured at warm-up on CUDA
    forward_chunking: bool = field(default=False)  # whether the last denoise needed it

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def synchronize(self) -> None:
        """Wait for queued device work, so a stage's clock stops when its work is done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def decode_chunk_size(self, requested: int | str, params: JobParams) -> int:
        """A number as asked, or for "auto" the largest chunk that fits the free device memory now."""
        if requested != "auto":
            return min(int(requested), params.num_frames)
        if self.device.type != "cuda" or self.decode_cost is None:
            return min(CPU_DECODE_CHUNK, params.num_frames)
        free = free_device_memory(self.device)
        return self.decode_cost.chunk_for(free, params.width, params.height, params.num_frames)

    def denoise(self, image: Image.Image, params: JobParams, seed: int, on_step: StepCallback) -> torch.Tensor:
        """Latents shaped (1, frames, 4, h, w). On out-of-memory, retries once with forward chunking."""
        self.forward_chunking = False
        try:
            return self._denoise(image, params, seed, on_step)
        except OutOfMemory:
            log.warning("denoise ran out of memory; retrying with the UNet's forward chunking")
        torch.cuda.empty_cache()
        self.forward_chunking = True
        self.pipe.unet.enable_forward_chunking()
        try:
            return self._denoise(image, params, seed, on_step)
        finally:
            self.pipe.unet.disable_forward_chunking()  # slower: only for the job that needs it

    def _denoise(self, image: Image.Image, params: JobParams, seed: int, on_step: StepCallback) -> torch.Tensor:
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


def tune_for_gpu(pipe: Any, compile_unet: bool) -> None:
    """Settings that only pay off on a GPU; each is applied once here, never per job."""
    # SVD's VAE asks for fp32 (`force_upcast`), and the pipeline would cast the whole VAE to fp32 and
    # back on every call. Keeping the encoder (one image per job) in fp32 for good, and the decoder
    # (every frame) in fp16, gives the same numerics with no per-job casts.
    if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.encoder.to(torch.float32)
        pipe.vae.quant_conv.to(torch.float32)
    pipe.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)


def warm_up(renderer: Renderer) -> None:
    """One short render at the default size, so the first job pays no kernel selection or compile."""
    defaults = JobParams()
    on_gpu = renderer.device.type == "cuda"
    size = {"width": defaults.width, "height": defaults.height} if on_gpu else {"width": 64, "height": 64}
    params = JobParams(num_frames=defaults.num_frames if on_gpu else 2, num_inference_steps=1, **size)
    image = Image.new("RGB", (params.width, params.height), (128, 128, 128))
    try:
        renderer.denoise(image, params, seed=0, on_step=lambda done, total: None)
    except OutOfMemory:  # a smaller GPU: jobs will find their own way (forward chunking, smaller chunks)
        log.warning("warm-up at %dx%d ran out of memory; skipped", params.width, params.height)
        torch.cuda.empty_cache()
        return
    if on_gpu:
        renderer.decode_cost = measure_decode_cost(renderer.vae, params.height, params.width,
                                                   renderer.vae_scale_factor)  # fmt: skip
        torch.cuda.empty_cache()


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
    if device.type == "cuda":
        tune_for_gpu(pipe, settings.compile)
    renderer = Renderer(pipe=pipe, device=device, dtype=dtype)
    if settings.warmup:
        warm_up(renderer)
    renderer.load_seconds = time.perf_counter() - started
    log.info("loaded %s on %s (%s) in %.1fs", settings.model, device, dtype, renderer.load_seconds)
    return renderer
