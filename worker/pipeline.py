"""Load StableVideoDiffusionPipeline once per worker process, keep it warm, run it to latents.

Decoding is not done here: the pipeline stops at latents (`output_type="latent"`) so the worker can
decode in chunks and stream frames to the encoder (see worker.decode).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from producer.contract import JobParams
from worker import compile_cache
from worker.decode import ChunkedDecoder, DecodeProfile, OutOfMemory, choose_chunk, profile_decode
from worker.settings import WorkerSettings
from worker.tuning import (
    Tuned,
    TuneOptions,
    attention_first,
    attention_shapes,
    compile_seconds,
    compiler_stance,
    set_forward_chunking,
    tune,
)

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """For `svdq top`: "cpu", or "cuda:0 NVIDIA H100 80GB HBM3 (CUDA_VISIBLE_DEVICES=3)" where --gpus chose."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cuda:{index} {torch.cuda.get_device_name(index)}" + (f" (CUDA_VISIBLE_DEVICES={chosen})" if chosen else "")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"SVDQ_DTYPE={name!r} is not a torch dtype (try float16, bfloat16, float32)")
    return dtype


# Chunk sizes timed at warm-up; low VRAM keeps to the smallest.
PROFILE_CHUNKS = (1, 2, 4, 8, 16)
LOW_VRAM_CHUNKS = (1, 2)


class RunAhead:
    """Keeps the host at most `depth` checkpoints ahead of the device. CUDA returns from each launch at once, so
    the host can queue work as far ahead as the driver's launch queue lets it; a cancel seen at a checkpoint
    would then wait for all of that. Waiting for the mark `depth` checkpoints back leaves the device that much
    queued work: it waits on the host only where queueing a layer takes longer than running two (on a GPU,
    bench/gpu_svd.py's totals against earlier runs will show whether that happens). Nothing to do off CUDA."""

    def __init__(self, device: torch.device, depth: int = 2, new_mark: Callable[[], Any] | None = None):
        self.depth = depth
        self._new_mark = new_mark or (_cuda_mark(device) if device.type == "cuda" else None)
        self._marks: collections.deque[Any] = collections.deque()

    def mark(self) -> None:
        if self._new_mark is None:
            return
        self._marks.append(self._new_mark())
        if len(self._marks) > self.depth:
            self._marks.popleft().synchronize()


def _layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's layers in its down, mid and up blocks: resnets and transformers (a block without, itself)."""
    layers: list[torch.nn.Module] = []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        layers += [*getattr(block, "resnets", ()), *(getattr(block, "attentions", None) or ())] or [block]
    return layers


def _cuda_mark(device: torch.device) -> Callable[[], Any]:
    def mark() -> Any:
        # Blocking: a wait for it sleeps rather than spin a core the encoder's thread could use.
        event = torch.cuda.Event(blocking=True)
        event.record(torch.cuda.current_stream(device))  # the job's device, not the current one (cuda:0)
        return event

    return mark


@dataclass
class Renderer:
    pipe: Any  # diffusers.StableVideoDiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0
    tuned: Tuned = field(default_factory=Tuned)
    # Measured at warm-up on CUDA: decode speed and memory by chunk, the denoise's peak, the memory budget.
    decode_profile: DecodeProfile | None = None
    denoise_peak_bytes: int = 0
    budget_bytes: float | None = None
    forward_chunking: bool = field(default=False)  # whether the last denoise needed it
    # Shapes (see `shape`) the compiled UNet has code for. Compiling a shape takes minutes the first time on
    # a machine, so only the warm-up compiles (the default size and SVDQ_COMPILE_SHAPES); a job at another
    # shape runs eagerly rather than stall its GPU unseen.
    compiled_shapes: set[tuple[int, int, int, bool]] = field(default_factory=set)
    compile_new_shapes: bool = True
    # The compiled VAE decoder's chunk sizes: the warm-up compiles the default job's; other sizes decode eagerly.
    compiled_decode_chunks: set[int] = field(default_factory=set)
    # Called at the UNet's checkpoints while a job denoises (see __post_init__): may raise to stop it there.
    checkpoint: Callable[[], None] | None = None
    run_ahead: RunAhead = field(init=False)

    def __post_init__(self) -> None:
        # Checkpoints: before each layer (resnet or transformer) of the UNet's blocks, not only before each block:
        # a block at full resolution holds much of a step (on the tiny model at 256x256, 58% and 38% of it, and a
        # cancel halfway through a step waited for the step's end). The layers are the compiled regions, and
        # Dynamo compiles a compiled module's hooks as frames of their own: disabled, this one stays eager, with
        # no graph break and no new graph, so compiled and uncompiled shapes alike check at every layer.
        self.run_ahead = RunAhead(self.device)
        unet = self.pipe.unet

        @torch.compiler.disable
        def at_checkpoint(module: torch.nn.Module, args: Any) -> None:
            if self.checkpoint is not None:
                self.checkpoint()
                self.run_ahead.mark()

        # A pipeline serves one renderer at a time (`svdq bench` makes several in turn): the last one's hooks only.
        for handle in getattr(unet, "_svdq_checkpoints", ()):
            handle.remove()
        unet._svdq_checkpoints = [module.register_forward_pre_hook(at_checkpoint) for module in _layers(unet)]

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

    def needs_compile(self, params: JobParams) -> bool:
        return self.compiles and self.compile_new_shapes and self.shape(params) not in self.compiled_shapes

    def runs_compiled(self, params: JobParams) -> bool:
        return self.compiles and (self.compile_new_shapes or self.shape(params) in self.compiled_shapes)

    @property
    def compiles(self) -> bool:
        return bool(self.tuned.compiled_regions)

    @staticmethod
    def shape(params: JobParams) -> tuple[int, int, int, bool]:
        """What the compiled graphs are specialised on: the size, the frames, and the guidance's batch of 2."""
        return (params.width, params.height, params.num_frames, params.max_guidance_scale > 1)

    def decode_stance(self) -> AbstractContextManager[object]:
        """Around each decode call: compiled code where the decoder has it, eager PyTorch for other chunk sizes
        (until the warm-up is over, a new size compiles)."""
        if not self.tuned.compiled_vae:
            return contextlib.nullcontext()
        return compiler_stance("default" if self.compile_new_shapes else "eager_on_recompile")

    def compile_decode(self, width: int, height: int, chunk: int) -> None:
        """Build the compiled decoder's code for `chunk` frames at this size (at warm-up: jobs never wait for it)."""
        scale = self.vae_scale_factor
        latent = torch.zeros(
            1,
            chunk,
            self.vae.config.latent_channels,
            height // scale,
            width // scale,
            device=self.device,
            dtype=self.dtype,
        )
        with compiler_stance("default"):
            for _ in ChunkedDecoder(self.vae, latent, chunk):
                pass
        self.compiled_decode_chunks.add(chunk)

    def choose_decode_chunk(self, requested: int | str, params: JobParams) -> int:
        """The decode chunk for a job on this renderer (policy: worker.decode.choose_chunk)."""
        return choose_chunk(requested, params, self.device, self.decode_profile, self.budget_bytes)

    def denoise(self, image: Image.Image, params: JobParams, seed: int, on_step: StepCallback) -> torch.Tensor:
        """Latents shaped (1, frames, 4, h, w). On out-of-memory, retries once with forward chunking."""
        self.forward_chunking = self.tuned.low_vram
        if self.tuned.low_vram:  # already as lean as it gets
            return self._denoise(image, params, seed, on_step)
        try:
            return self._denoise(image, params, seed, on_step)
        except OutOfMemory:
            log.warning("denoise ran out of memory; retrying with the UNet's forward chunking")
        torch.cuda.empty_cache()
        self.forward_chunking = True
        set_forward_chunking(self.pipe.unet, True)
        try:
            return self._denoise(image, params, seed, on_step)
        finally:
            set_forward_chunking(self.pipe.unet, False)  # slower: only for the job that needs it

    def _denoise(self, image: Image.Image, params: JobParams, seed: int, on_step: StepCallback) -> torch.Tensor:
        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step + 1, params.num_inference_steps)
            return tensors

        # A CPU generator gives the same noise for a seed on every device.
        generator = torch.Generator("cpu").manual_seed(seed)
        # "eager_on_recompile": compiled code where it exists for these shapes, eager PyTorch where it does not.
        stance = "force_eager" if not self.compiles else "default" if self.compile_new_shapes else "eager_on_recompile"
        with torch.inference_mode(), attention_first(self.tuned.attention), compiler_stance(stance):
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
        if self.compiles and self.compile_new_shapes:
            self.compiled_shapes.add(self.shape(params))
        return out.frames


def _dtype_kwarg() -> str:
    """`dtype` on diffusers that renamed `torch_dtype` (the old name warns), `torch_dtype` before that."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def tune_options(settings: WorkerSettings, device: torch.device) -> TuneOptions:
    compile_unet = device.type == "cuda" if settings.compile == "auto" else bool(settings.compile)
    return TuneOptions(
        compile=compile_unet,
        compile_vae=compile_unet if settings.compile_vae == "auto" else bool(settings.compile_vae),
        compile_backend=settings.compile_backend,
        channels_last=settings.channels_last,
        attention=settings.attention,
        low_vram=settings.low_vram,
    )


def parse_shapes(spec: str) -> list[JobParams]:
    """SVDQ_COMPILE_SHAPES: `WIDTHxHEIGHTxFRAMES[,...]`, e.g. `1024x576x14,576x1024x25`."""
    shapes = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            width, height, frames = (int(n) for n in part.lower().split("x"))
            shapes.append(JobParams(width=width, height=height, num_frames=frames, num_inference_steps=1))
        except ValueError as exc:
            raise ValueError(f"SVDQ_COMPILE_SHAPES: {part!r} is not WIDTHxHEIGHTxFRAMES within the job limits") from exc
    return shapes


def warm_up(renderer: Renderer, max_vram_gib: float | None = None, extra_shapes: list[JobParams] = ()) -> None:
    """One short render at the default size (and at `extra_shapes`), so jobs pay no kernel selection or compile;
    on CUDA, it also measures the denoise's peak and the decode's speed and memory by chunk, and sets the budget.
    After it, shapes not seen here run eagerly instead of compiling."""
    defaults = JobParams()
    on_gpu = renderer.device.type == "cuda"
    size = {"width": defaults.width, "height": defaults.height} if on_gpu else {"width": 64, "height": 64}
    params = JobParams(num_frames=defaults.num_frames if on_gpu else 2, num_inference_steps=1, **size)
    image = Image.new("RGB", (params.width, params.height), (128, 128, 128))
    for extra in extra_shapes:
        renderer.denoise(image, extra, seed=0, on_step=lambda done, total: None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(renderer.device)
    try:
        latents = renderer.denoise(image, params, seed=0, on_step=lambda done, total: None)
    except OutOfMemory:  # a smaller GPU: jobs will find their own way (forward chunking, smaller chunks)
        log.warning("warm-up at %dx%d ran out of memory; skipped", params.width, params.height)
        torch.cuda.empty_cache()
        return
    finally:
        renderer.compile_new_shapes = False
    if on_gpu:
        del latents
        profile_decoding(renderer, params, max_vram_gib)
    if renderer.tuned.compiled_vae:  # the chunk a default job decodes with: compiling a size takes ~40 s
        renderer.compile_decode(params.width, params.height, renderer.choose_decode_chunk("auto", params))
        torch.cuda.empty_cache()


def profile_decoding(renderer: Renderer, params: JobParams, max_vram_gib: float | None) -> None:
    """After the warm-up's denoise: its peak, the decode's speed and memory by chunk, and the memory budget."""
    renderer.denoise_peak_bytes = torch.cuda.max_memory_allocated(renderer.device)
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated(renderer.device)
    explicit = max_vram_gib * 2**30 if max_vram_gib else None
    # No cap given: the decode may use what the denoise already needed, never more (a chunk of 1 at least),
    # so the job's peak is its denoise's, below what stock diffusers takes for the same job.
    budget = explicit or renderer.denoise_peak_bytes
    chunks = LOW_VRAM_CHUNKS if renderer.tuned.low_vram else PROFILE_CHUNKS
    renderer.decode_profile = profile_decode(
        renderer.vae,
        renderer.device,
        params.height,
        params.width,
        renderer.vae_scale_factor,
        chunks,
        budget - resident,
        stance=lambda: compiler_stance("force_eager"),
    )
    renderer.budget_bytes = max(budget, resident + renderer.decode_profile.cost(1))
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
    options = tune_options(settings, device)
    extra_shapes = parse_shapes(settings.compile_shapes) if options.compile else []  # a bad value fails first
    started = time.perf_counter()
    kwargs = {_dtype_kwarg(): dtype, "variant": settings.model_variant}
    pipe = StableVideoDiffusionPipeline.from_pretrained(settings.model, **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    cache_dir = None
    if options.compile:
        cache_dir = compile_cache.configure(Path(settings.compile_cache_dir or compile_cache.default_cache_dir()))
        compile_cache.load_artifacts(cache_dir)
    renderer = Renderer(pipe=pipe, device=device, dtype=dtype)
    defaults = JobParams()
    shapes = attention_shapes(
        pipe.unet, defaults.width, defaults.height, defaults.num_frames, renderer.vae_scale_factor
    )
    renderer.tuned = tune(pipe, device, dtype, options, shapes)
    compiled_before = compile_seconds()
    if settings.warmup:
        warm_up(renderer, settings.max_vram_gib, extra_shapes)
    if cache_dir is not None and settings.warmup:
        compile_cache.save_artifacts(cache_dir)
    renderer.load_seconds = time.perf_counter() - started
    log.info(
        "loaded %s on %s (%s) in %.1fs (compile %.1fs): %s",
        settings.model,
        device,
        dtype,
        renderer.load_seconds,
        compile_seconds() - compiled_before,
        renderer.tuned.describe(),
    )
    if renderer.decode_profile is not None:
        log.info(
            "decode chunk %d preferred (ms per frame by chunk, each timed run: %s); budget %.1f GiB, denoise peak "
            "%.1f GiB",
            renderer.decode_profile.preferred(),
            renderer.decode_profile.describe(),
            (renderer.budget_bytes or 0) / 2**30,
            renderer.denoise_peak_bytes / 2**30,
        )
    return renderer
