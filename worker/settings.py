"""Worker settings: the producer's, plus the model, the device and the encoder."""

from __future__ import annotations

from producer.settings import Settings


class WorkerSettings(Settings):
    # A hub id or a local directory written by `save_pretrained` (`svdq make-tiny-model` makes one).
    model: str = "stabilityai/stable-video-diffusion-img2vid-xt"
    # e.g. "fp16" to fetch the half-size weights of the official checkpoints.
    model_variant: str | None = None
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float16 on cuda, float32 on cpu
    # Frames decoded by the VAE at once when a request does not say; memory grows with it.
    decode_chunk_size: int = 8
    # x264 settings for the mp4: a fast preset, visually lossless CRF.
    x264_preset: str = "veryfast"
    x264_crf: int = 18
    # Seconds a worker process may spend loading the model before Celery gives up on it.
    load_timeout: float = 900.0
