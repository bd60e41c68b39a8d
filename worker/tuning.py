"""What svdq does to a loaded pipeline to make it fast and lean, one function per transform.

Every transform here runs on a CPU too (tests/unit/test_tuning.py runs each on the tiny pipeline), because
code that first ran on a GPU crashed on it: `unet.to(memory_format=torch.channels_last)` converts every
4-D *and* 5-D parameter and raises on the temporal Conv3d weights, so the first H100 worker never started.

1. VAE precision split: encoder in fp32 (one image per job), decoder in fp16 (every frame).
2. channels_last on the UNet's 2-D convolutions only (`TuneOptions.channels_last`, which the worker leaves off:
   on an H100 the eager UNet with it and cuDNN attention denoised in 18.6 s against stock's 16.9 s,
   docs/PERFORMANCE.md; Inductor picks its own layouts).
3. Attention: the fastest exact SDPA kernel, timed at the model's own largest attention shapes (CUDA).
4. Regional compilation: torch.compile on each repeated block rather than the whole UNet, so there are
   few distinct graphs to build; the compiled code lives in a persistent cache (worker.compile_cache).
   The VAE's decoder is compiled whole: on an H100 it decodes 2.1x faster per frame (72 -> 34 ms at 1024x576,
   chunk 4), since its eager kernels are small and many; it is compiled at one chunk size (worker.pipeline).
5. Low VRAM: the UNet's feed-forward split in slices (SplitFeedForward) and diffusers' model CPU offload.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# The UNet's repeated blocks: each class is compiled once per input shape and reused by every instance.
COMPILE_REGIONS = ("SpatioTemporalResBlock", "TransformerSpatioTemporalModel")

# Exact attention kernels, in PyTorch's preference order; "auto" times them and puts the fastest first.
ATTENTION_BACKENDS = {
    "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    "efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    "math": torch.nn.attention.SDPBackend.MATH,
}


@dataclass(frozen=True)
class TuneOptions:
    compile: bool = False
    compile_backend: str = "inductor"
    compile_vae: bool = False
    channels_last: bool = False
    attention: str = "auto"
    low_vram: bool = False


@dataclass
class Tuned:
    """What was applied, for the log, `svdq top` and the benchmark."""

    vae_split: bool = False
    channels_last_convs: int = 0
    compiled_regions: int = 0
    compiled_vae: bool = False
    attention: str = "default"
    attention_timings: dict[str, float] | None = None
    low_vram: bool = False

    def describe(self) -> str:
        parts = [f"attention={self.attention}"]
        if self.compiled_regions:
            parts.append(f"compiled {self.compiled_regions} UNet blocks")
        if self.compiled_vae:
            parts.append("compiled VAE decoder")
        if self.channels_last_convs:
            parts.append(f"channels_last on {self.channels_last_convs} convs")
        if self.vae_split:
            parts.append("VAE encoder fp32 / decoder fp16")
        if self.low_vram:
            parts.append("low VRAM (forward chunking, model offload)")
        return ", ".join(parts)


def split_vae_precision(pipe: Any) -> bool:
    """SVD's VAE asks for fp32 (`force_upcast`), and the pipeline would cast the whole VAE to fp32 and back on
    every call. The encoder (one image per job) stays in fp32 for good and the decoder (every frame) in fp16:
    the same numerics, no per-job casts. `pipe.vae.dtype` then reads fp32, so the pipeline skips its cast."""
    if pipe.vae.dtype != torch.float16 or not pipe.vae.config.force_upcast:
        return False
    pipe.vae.encoder.to(torch.float32)
    pipe.vae.quant_conv.to(torch.float32)
    return True


def conv2d_channels_last(module: torch.nn.Module) -> int:
    """channels_last for each Conv2d's weight; the Conv3d weights (rank 5) cannot take it."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, torch.nn.Conv2d):
            sub.to(memory_format=torch.channels_last)
            count += 1
    return count


def _static_shapes() -> None:
    # Each block class is called at several shapes (one per UNet level): a static graph per shape gives the
    # best kernels, and the default limit of 8 per code object would send the rest back to eager mode. Static
    # shapes also let a job at a shape nobody compiled run eagerly ("eager_on_recompile") instead of stalling.
    config = torch._dynamo.config
    config.automatic_dynamic_shapes = False
    # About 14 graphs per block class for each SVD-XT shape (levels x in/out channels), times the warmed shapes.
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across PyTorch releases
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 256))


def compile_regions(module: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile each repeated block in place (`Module.compile`); returns how many."""
    _static_shapes()
    count = 0
    for sub in module.modules():
        if type(sub).__name__ in COMPILE_REGIONS:
            sub.compile(backend=backend)
            count += 1
    if not count:
        raise ValueError(f"no {' or '.join(COMPILE_REGIONS)} in {type(module).__name__}: nothing to compile")
    return count


def compile_decoder(vae: torch.nn.Module, backend: str = "inductor") -> bool:
    """torch.compile the VAE's decoder in place; its graphs are built at its first call per chunk size."""
    _static_shapes()
    vae.decoder.compile(backend=backend)
    return True


def compile_seconds() -> float:
    """Seconds this process has spent compiling with torch.compile so far (Dynamo's own accounting)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover - older PyTorch
        return 0.0
    return float(sum(sum(v) for k, v in compilation_time_metrics.items() if k.endswith("compile_inner")))


def attention_shapes(unet: Any, width: int, height: int, frames: int, vae_scale_factor: int) -> list[tuple]:
    """(batch, heads, tokens, head_dim) of the UNet's largest spatial and temporal attention at this size,
    with classifier-free guidance's batch of two."""
    channels = unet.config.block_out_channels[0]
    heads = unet.config.num_attention_heads
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    tokens = (height // vae_scale_factor) * (width // vae_scale_factor)
    return [(2 * frames, heads, tokens, channels // heads), (2 * tokens, heads, frames, channels // heads)]


def time_attention(
    backend: str, shapes: list[tuple], device: torch.device, dtype: torch.dtype, repeat: int = 3
) -> float | None:
    """Seconds for one call at each shape with only `backend` allowed; None where it cannot run them."""
    queries = [torch.randn(shape, device=device, dtype=dtype) for shape in shapes]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        with torch.nn.attention.sdpa_kernel(ATTENTION_BACKENDS[backend]), torch.inference_mode():
            for q in queries:  # the first call may pick or build kernels
                sdpa(q, q, q)
            _sync(device)
            started = time.perf_counter()
            for _ in range(repeat):
                for q in queries:
                    sdpa(q, q, q)
            _sync(device)
    except RuntimeError as exc:  # "No available kernel" for this shape, dtype or GPU
        log.debug("attention backend %s unavailable: %s", backend, exc)
        return None
    return (time.perf_counter() - started) / repeat


def pick_attention(
    choice: str, shapes: list[tuple], device: torch.device, dtype: torch.dtype
) -> tuple[str, dict[str, float]]:
    """The backend to put first: as configured, or for "auto" the fastest exact kernel measured at `shapes`
    (on a CPU: PyTorch's default order, which is what runs there anyway)."""
    if choice != "auto":
        if choice not in ATTENTION_BACKENDS:
            raise ValueError(f"SVDQ_ATTENTION={choice!r}: choose auto, {', '.join(ATTENTION_BACKENDS)}")
        return choice, {}
    if device.type != "cuda":
        return "default", {}
    timings = {}
    for name in ("flash", "cudnn", "efficient"):
        if (seconds := time_attention(name, shapes, device, dtype)) is not None:
            timings[name] = round(seconds, 5)
    if not timings:
        return "default", {}
    return min(timings, key=timings.__getitem__), timings


def _has_parameter(function: Any, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


# PyTorch 2.6 added kernel priorities and compiler stances; on older releases both are skipped (no preference,
# and new shapes compile when they come), never an error.
_SDPA_PRIORITY = _has_parameter(torch.nn.attention.sdpa_kernel, "set_priority")
_STANCES = hasattr(torch.compiler, "set_stance")


@contextlib.contextmanager
def attention_first(name: str) -> Iterator[None]:
    """Prefer the chosen SDPA kernel; the others stay allowed, in PyTorch's order, for shapes it cannot run."""
    if name not in ATTENTION_BACKENDS or not _SDPA_PRIORITY:
        yield
        return
    order = [ATTENTION_BACKENDS[name], *(b for n, b in ATTENTION_BACKENDS.items() if n != name)]
    with torch.nn.attention.sdpa_kernel(order, set_priority=True):
        yield


def compiler_stance(stance: str) -> contextlib.AbstractContextManager[Any]:
    """torch.compiler.set_stance as a context manager ("force_eager", "eager_on_recompile", "default")."""
    return torch.compiler.set_stance(stance) if _STANCES else contextlib.nullcontext()


class SplitFeedForward(torch.nn.Module):
    """A transformer block's feed-forward run on `parts` slices of its batch in turn, so its widest activation
    (GEGLU's projection, 8x the model width) exists for one slice at a time: about 2.4 GB less at SVD-XT's
    1024x576x25. diffusers' own `enable_forward_chunking` slices one batch item at a time, which for SVD's
    temporal blocks (one item per latent pixel) meant 18,432 calls per block and a 4.7x slower denoise."""

    def __init__(self, ff: torch.nn.Module, parts: int):
        super().__init__()
        self.ff, self.parts = ff, parts

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pieces = hidden_states.chunk(self.parts, dim=0)
        return torch.cat([self.ff(piece, *args, **kwargs) for piece in pieces], dim=0)


FEED_FORWARDS = ("ff", "ff_in")  # BasicTransformerBlock.ff, TemporalBasicTransformerBlock.ff_in and .ff
SPLIT_PARTS = 8


def set_forward_chunking(unet: torch.nn.Module, on: bool, parts: int = SPLIT_PARTS) -> int:
    """Split (or restore) every transformer block's feed-forward; returns how many were changed."""
    changed = 0
    for module in list(unet.modules()):
        if isinstance(module, SplitFeedForward):
            continue
        for name in FEED_FORWARDS:
            ff = getattr(module, name, None)
            if on and type(ff).__name__ == "FeedForward":
                setattr(module, name, SplitFeedForward(ff, parts))
                changed += 1
            elif not on and isinstance(ff, SplitFeedForward):
                setattr(module, name, ff.ff)
                changed += 1
    return changed


def enable_low_vram(pipe: Any, device: torch.device) -> None:
    """Feed-forward in slices in the UNet's transformer blocks, and each model on the GPU only while it runs
    (diffusers' model CPU offload: each model goes back to the CPU when the next one in the sequence runs)."""
    set_forward_chunking(pipe.unet, True)
    if device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)


def disable_low_vram(pipe: Any, device: torch.device) -> None:
    """Undo `enable_low_vram` (the benchmark measures both modes on one pipeline)."""
    set_forward_chunking(pipe.unet, False)
    if device.type == "cuda":
        pipe.remove_all_hooks()
        pipe.to(device)


def tune(pipe: Any, device: torch.device, dtype: torch.dtype, options: TuneOptions, shapes: list[tuple]) -> Tuned:
    """Apply every transform that `options` asks for, in order; each once per process, never per job."""
    tuned = Tuned()
    # 1. VAE precision split.
    tuned.vae_split = split_vae_precision(pipe)
    # 2. channels_last, where asked.
    if options.channels_last:
        tuned.channels_last_convs = conv2d_channels_last(pipe.unet)
    # 3. Attention kernel, chosen before compiling: the compiled graphs bake in the kernel they trace.
    tuned.attention, tuned.attention_timings = pick_attention(options.attention, shapes, device, dtype)
    # 4. Regional compilation, and the VAE's decoder (the graphs are built at the first call: the warm-up).
    if options.compile:
        tuned.compiled_regions = compile_regions(pipe.unet, options.compile_backend)
    if options.compile_vae:
        tuned.compiled_vae = compile_decoder(pipe.vae, options.compile_backend)
    # 5. Low VRAM.
    if options.low_vram:
        enable_low_vram(pipe, device)
        tuned.low_vram = True
    return tuned


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
