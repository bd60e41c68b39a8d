"""Latents to uint8 frames, `chunk_size` frames at a time, so memory is set by the chunk, not the video."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1], (n, 3, H, W) -> (n, H, W, 3) uint8, converted on the device.

    Rounds exactly as diffusers' VideoProcessor does for PIL output, so the frames match the stock path.
    """
    scaled = (frames / 2 + 0.5).clamp(0, 1).float() * 255
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


@torch.inference_mode()
def decode_chunks(vae: torch.nn.Module, latents: torch.Tensor, chunk_size: int) -> Iterator[np.ndarray]:
    """Yield decoded frames chunk by chunk. `latents` is (1, frames, channels, h, w) from the pipeline."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat = latents.flatten(0, 1) / vae.config.scaling_factor
    for start in range(0, flat.shape[0], chunk_size):
        part = flat[start : start + chunk_size].to(vae.dtype)
        # The temporal decoder mixes frames within a chunk, so it must be told how many there are.
        yield to_uint8(vae.decode(part, num_frames=part.shape[0]).sample)
