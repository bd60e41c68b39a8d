"""Latents to 8-bit frames, a chunk at a time, so memory is set by the chunk size and not the video.

Each chunk is converted to uint8 on the device (to RGB, or straight to the encoder's YUV 4:2:0, a
third of the bytes to move), and a chunk that runs out of device memory is decoded again in halves
without touching the latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

OutOfMemory = torch.cuda.OutOfMemoryError
CPU_DECODE_CHUNK = 8  # "auto" on a CPU: memory there is plentiful and the speed barely depends on it

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
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.vae, self.latents, self.chunk_size, self.free_cache = vae, latents, chunk_size, free_cache
        self.halvings = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        flat = self.latents.flatten(0, 1) / self.vae.config.scaling_factor
        dtype = next(self.vae.decoder.parameters()).dtype  # the decoder may differ from the encoder
        start = 0
        while start < flat.shape[0]:
            part = flat[start : start + self.chunk_size].to(dtype)
            try:
                with torch.inference_mode():
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
class DecodeCost:
    """Device memory a decode needs: `fixed + per_frame * n` bytes, measured at `pixels` per frame."""

    fixed: float
    per_frame: float
    pixels: int

    def chunk_for(self, free_bytes: float, width: int, height: int, num_frames: int, headroom: float = 0.8) -> int:
        """The largest chunk that fits `headroom` of the free memory at this size, within 1..num_frames."""
        scale = width * height / self.pixels
        budget = free_bytes * headroom - self.fixed * scale
        if self.per_frame <= 0:
            return num_frames
        return max(1, min(num_frames, math.floor(budget / (self.per_frame * scale))))


def measure_decode_cost(vae: torch.nn.Module, height: int, width: int, scale_factor: int) -> DecodeCost:
    """Decode 1 and 2 frames of zeros at this size and read the device's peak memory for each."""
    device = next(vae.decoder.parameters()).device
    latents = torch.zeros(1, 2, vae.config.latent_channels, height // scale_factor, width // scale_factor,
                          device=device)  # fmt: skip
    peaks = []
    for n in (1, 2):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in ChunkedDecoder(vae, latents[:, :n], n):
            pass
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_frame = max(peaks[1] - peaks[0], 1)
    return DecodeCost(fixed=max(peaks[0] - per_frame, 0), per_frame=per_frame, pixels=width * height)


def free_device_memory(device: torch.device) -> int:
    """Free bytes on the device, counting what PyTorch's cache holds but does not use."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
