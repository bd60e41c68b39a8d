"""Latents to 8-bit frames, a chunk at a time, so memory is set by the chunk size and not the video.

Each chunk is converted to uint8 on the device (to RGB, or straight to the encoder's YUV 4:2:0, a
third of the bytes to move), and a chunk that runs out of device memory is decoded again in halves
without touching the latents.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch

from producer.contract import JobParams

OutOfMemory = torch.cuda.OutOfMemoryError
CPU_DECODE_CHUNK = 8  # "auto" on a CPU: memory there is plentiful and the speed barely depends on it
PROFILE_FRAMES = 4  # frames decoded per chunk size when profiling (a chunk of 1 is timed over 4 calls)
UNPROFILED_CUDA_CHUNK = 2  # 8 frames of 1024x576 take 10.7 GiB: a small GPU would halve its way down anyway

# BT.601, limited range: what ffmpeg's own rgb24 -> yuv420p conversion uses, tagged as such in the file.
_RGB_TO_YUV = torch.tensor(
    [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=torch.float32
)
_YUV_OFFSET = torch.tensor([16.0, 128.0, 128.0])


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> float32 in [0, 1], as diffusers' VideoProcessor denormalises it."""
    return (frames / 2 + 0.5).clamp(0, 1).float()


def to_rgb24(frames: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) VAE output -> (n, H, W, 3) uint8, rounded exactly as diffusers rounds for PIL output."""
    return (to_unit(frames) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def to_yuv420p(frames: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) VAE output -> (n, H*W*3/2) uint8 planar YUV 4:2:0, converted on the device."""
    rgb = to_unit(frames)
    matrix, offset = _RGB_TO_YUV.to(rgb.device), _YUV_OFFSET.to(rgb.device)
    yuv = torch.einsum("ij,njhw->nihw", matrix, rgb) + offset[None, :, None, None]
    luma = yuv[:, 0].round().clamp(0, 255).to(torch.uint8).flatten(1)
    # Chroma: the mean of each 2x2 block, as 4:2:0 sampling asks.
    chroma = torch.nn.functional.avg_pool2d(yuv[:, 1:], 2).round().clamp(0, 255).to(torch.uint8).flatten(1)
    return torch.cat([luma, chroma], dim=1).cpu().numpy()


class ChunkedDecoder:
    """Decodes latents `chunk_size` frames at a time, halving the chunk on out-of-memory down to 1.

    `latents` is (1, frames, channels, h, w), as the pipeline returns with `output_type="latent"`.
    Iterating yields decoded frames (n, 3, H, W) on the device. `chunk_size` and `halvings` say what
    was finally used.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        latents: torch.Tensor,
        chunk_size: int,
        free_cache: Callable[[], None] = torch.cuda.empty_cache,
        stance: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.vae, self.latents, self.chunk_size, self.free_cache = vae, latents, chunk_size, free_cache
        # Entered around each decode call only (a global setting must not leak into the caller between chunks).
        self.stance = stance
        self.halvings = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        flat = self.latents.flatten(0, 1) / self.vae.config.scaling_factor
        dtype = next(self.vae.decoder.parameters()).dtype  # the decoder may differ from the encoder
        start = 0
        while start < flat.shape[0]:
            part = flat[start : start + self.chunk_size].to(dtype)
            try:
                with torch.inference_mode(), self.stance():
                    # The temporal decoder mixes frames within a chunk, so it must know how many.
                    frames = self.vae.decode(part, num_frames=part.shape[0]).sample
            except OutOfMemory:
                if self.chunk_size == 1:
                    raise
                self.chunk_size = max(1, self.chunk_size // 2)
                self.halvings += 1
                frames = None
            if frames is None:
                self.free_cache()  # outside the except block, once the failed attempt's tensors are gone
                continue
            start += part.shape[0]
            yield frames


@dataclass(frozen=True)
class DecodeProfile:
    """Decode speed and memory by chunk size, measured at warm-up at one frame size (`pixels` per frame).

    `seconds_per_frame[n]` (the fastest of `timings[n]`) and `peak_bytes[n]` (above what was allocated before
    the decode) for each chunk size `n` tried. Memory is modelled as `fixed + per_frame * n`, scaled by pixels
    for other frame sizes.
    """

    pixels: int
    seconds_per_frame: dict[int, float]
    peak_bytes: dict[int, int]
    timings: dict[int, tuple[float, ...]] = field(default_factory=dict)  # every timed run, in order: for the log

    def cost(self, chunk: int, pixels: int | None = None) -> float:
        """Bytes a decode of `chunk` frames needs, at `pixels` per frame (default: the measured size)."""
        sizes = sorted(self.peak_bytes)
        low, high = sizes[0], sizes[-1]
        per_frame = (self.peak_bytes[high] - self.peak_bytes[low]) / (high - low) if high > low else 0.0
        fixed = self.peak_bytes[low] - per_frame * low
        if per_frame <= 0:  # one size measured: assume the whole cost grows with the frames
            fixed, per_frame = 0.0, self.peak_bytes[low] / low
        return (max(fixed, 0.0) + per_frame * chunk) * (pixels or self.pixels) / self.pixels

    def describe(self) -> str:
        """Milliseconds per frame by chunk, every timed run in the order taken: "1: 90.1 88.2, 2: 80.0 79.7"."""
        runs = self.timings or {n: (s,) for n, s in self.seconds_per_frame.items()}
        return ", ".join(f"{n}: " + " ".join(f"{s * 1000:.1f}" for s in seen) for n, seen in runs.items())

    def preferred(self, tolerance: float = 0.05) -> int:
        """The smallest chunk whose speed is within `tolerance` of the fastest measured."""
        best = min(self.seconds_per_frame.values())
        return min(n for n, s in self.seconds_per_frame.items() if s <= best * (1 + tolerance))

    def chunk_for(self, budget_bytes: float, width: int, height: int, num_frames: int) -> int:
        """The preferred chunk, smaller where `budget_bytes` cannot hold it at this size; within 1..num_frames."""
        pixels = width * height
        chunk = min(self.preferred(), num_frames)
        while chunk > 1 and self.cost(chunk, pixels) > budget_bytes:
            chunk -= 1
        return max(1, chunk)


class CudaMemory:
    """What the profile reads of the CUDA caching allocator (a test on a CPU passes its own)."""

    def __init__(self, device: torch.device):
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def profile_decode(
    vae: torch.nn.Module,
    device: torch.device,
    height: int,
    width: int,
    scale_factor: int,
    chunks: tuple[int, ...],
    budget_bytes: float,
    stance: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    runs: int = 2,
    memory: CudaMemory | None = None,
) -> DecodeProfile:
    """Time decodes of zeros at each chunk size. Each size decodes the same frames (at least PROFILE_FRAMES, in
    chunks of its size) once untimed (the first call at a shape sets up kernels), then `runs` times timed,
    keeping the fastest. The timed runs go round the sizes in turn rather than one size after another, so
    whatever else slows the device for a while (in a worker on an H100, chunk 1 came out fastest twice where the
    bench on the same machine had it 24% slower) touches every size, not the sizes timed during it. Sizes whose
    estimated cost exceeds `budget_bytes`, once two sizes are known, are skipped. `stance` wraps each decode (the
    compiled decoder is profiled eagerly)."""
    memory = memory or CudaMemory(device)
    frames = max(PROFILE_FRAMES, *chunks)
    latent = torch.zeros(
        1, frames, vae.config.latent_channels, height // scale_factor, width // scale_factor, device=device
    )

    def decode(n: int) -> float:
        sample = latent[:, : max(PROFILE_FRAMES, n)]
        memory.synchronize()
        started = time.perf_counter()
        for _ in ChunkedDecoder(vae, sample, n, stance=stance):
            pass
        memory.synchronize()
        return (time.perf_counter() - started) / sample.shape[1]

    timings: dict[int, list[float]] = {}
    peaks: dict[int, int] = {}
    for n in sorted(chunks):
        if len(peaks) >= 2 and DecodeProfile(width * height, {}, peaks).cost(n) > budget_bytes:
            break
        decode(n)  # untimed
        memory.empty_cache()
        base = memory.allocated()
        memory.reset_peak()
        timings[n] = [decode(n)]
        peaks[n] = memory.peak() - base
    for _ in range(runs - 1):
        for n, seen in timings.items():
            seen.append(decode(n))
    return DecodeProfile(
        pixels=width * height,
        seconds_per_frame={n: min(seen) for n, seen in timings.items()},
        peak_bytes=peaks,
        timings={n: tuple(seen) for n, seen in timings.items()},
    )


def free_device_memory(device: torch.device) -> int:
    """Free bytes on the device, counting what PyTorch's cache holds but does not use."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def choose_chunk(
    requested: int | str,
    params: JobParams,
    device: torch.device,
    profile: DecodeProfile | None,
    budget_bytes: int | None,
) -> int:
    """A number as asked, or for "auto" the smallest chunk within 5% of the fastest decode measured at
    warm-up (`profile`), made smaller where it would not fit the memory budget (or the free memory) at this size.
    A chunk that still runs out of memory is halved while decoding (ChunkedDecoder)."""
    if requested != "auto":
        return min(int(requested), params.num_frames)
    if device.type != "cuda":
        return min(CPU_DECODE_CHUNK, params.num_frames)
    if profile is None:  # no warm-up (SVDQ_WARMUP=0, or it ran out of memory): play safe
        return min(UNPROFILED_CUDA_CHUNK, params.num_frames)
    room = free_device_memory(device) * 0.9
    if budget_bytes is not None:
        room = min(room, budget_bytes - torch.cuda.memory_allocated(device))
    return profile.chunk_for(room, params.width, params.height, params.num_frames)
