"""A tiny random-weights SVD pipeline, written with `save_pretrained`.

Tests and the demo load it through the same `from_pretrained` path as a real checkpoint, on a CPU,
with no model hub. Its videos are noise; its shapes, classes and code paths are SVD's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch


def svd_vae() -> Any:
    """SVD's real VAE architecture, random weights."""
    from diffusers import AutoencoderKLTemporalDecoder

    return AutoencoderKLTemporalDecoder(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    )


def build_tiny_pipeline(full_vae: bool = False) -> Any:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        # The pipeline passes three added time ids (fps, motion bucket, noise aug).
        projection_class_embeddings_input_dim=3 * 32,
        addition_time_embed_dim=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    torch.manual_seed(0)
    if full_vae:
        vae = svd_vae()  # what memory benchmarks must measure
    else:
        # Three blocks: latents 4x smaller than the frames. With two (2x), the UNet's attention over a
        # 64x64 video's 32x32 latents made each step about five times slower on a CPU.
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            latent_channels=4,
        )
    torch.manual_seed(0)
    # The pipeline resizes PIL input to 224x224 for CLIP, so the tower must take 224.
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            intermediate_size=37,
            patch_size=32,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )


def make_tiny_model(directory: Path, full_vae: bool = False) -> Path:
    build_tiny_pipeline(full_vae).save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="svdq make-tiny-model", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--full-vae", action="store_true", help="SVD's full-size VAE (for memory benchmarks)")
    args = parser.parse_args(argv)
    print(make_tiny_model(args.directory, args.full_vae))


if __name__ == "__main__":
    main()
