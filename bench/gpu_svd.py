"""Full-size SVD-XT, random weights: seconds per video per stage and peak VRAM, stock diffusers against svdq.

The architecture is SVD-XT's (diffusers' default UNetSpatioTemporalConditionModel, SVD's VAE, a ViT-H/14-sized
CLIP vision tower), built on the GPU with random weights: no download. fp16, 25 frames, 1024x576, 25 steps.
One JSON line per figure; the paths and figures are `svdq bench`'s (worker/bench.py), which users run on their
own GPU and model.

On a GPU: `python bench/gpu_svd.py [--repeat N] [--paths stock,eager,lowvram,svdq]`;
on a CPU, the same code with the tiny model: `python bench/gpu_svd.py --small`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.bench import build_full_svd_xt, main

__all__ = ["build_full_svd_xt"]

if __name__ == "__main__":
    argv = sys.argv[1:]
    main(["--json", *argv] if "--small" in argv else ["--json", "--random-weights", *argv])
