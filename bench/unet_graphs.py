"""How many graphs the worker's regional compile builds for SVD-XT's UNet at one job shape.

A cold start's compile time goes by graphs: Inductor lowers each distinct graph and builds its kernels once, and
instances of a block class at the same shapes share one. This traces the UNet as the worker compiles it (each
SpatioTemporalResBlock and TransformerSpatioTemporalModel on its own, static shapes) on the meta device, with a
backend that only counts: no GPU, no weights, seconds on a CPU. `--dynamic` traces again with dynamic shapes, the
other way to get fewer graphs. One JSON line per figure:

  python bench/unet_graphs.py [--width 1024 --height 576 --frames 25] [--dynamic] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.tuning import COMPILE_REGIONS, _static_shapes


def build_unet(tiny: bool) -> torch.nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel

    if tiny:
        from worker.tiny_model import build_tiny_pipeline

        unet = build_tiny_pipeline().unet
    else:
        with torch.device("meta"):
            unet = UNetSpatioTemporalConditionModel()  # diffusers' defaults are SVD-XT's UNet
    # AlphaBlender's mix factor is made with torch.Tensor(...), which ignores the device context: moved here.
    return unet.to(device="meta", dtype=torch.float16)


def count_graphs(unet: torch.nn.Module, width: int, height: int, frames: int, dynamic: bool) -> dict[str, Any]:
    torch._dynamo.reset()
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    _static_shapes()
    regions = 0
    for sub in unet.modules():
        if type(sub).__name__ in COMPILE_REGIONS:
            sub.compile(backend=counting, dynamic=dynamic or None)
            regions += 1
    config = unet.config
    cfg = 2  # classifier-free guidance's batch
    sample = torch.zeros(cfg, frames, config.in_channels, height // 8, width // 8, device="meta", dtype=torch.float16)
    context = torch.zeros(cfg, 1, config.cross_attention_dim, device="meta", dtype=torch.float16)
    time_ids = torch.zeros(cfg, 3, device="meta", dtype=torch.float16)
    started = time.perf_counter()
    with torch.inference_mode():
        unet(sample, torch.tensor([1.0], device="meta"), encoder_hidden_states=context, added_time_ids=time_ids)
    for sub in unet.modules():
        if type(sub).__name__ in COMPILE_REGIONS:
            sub._compiled_call_impl = None  # back to eager for the next count
    return {"regions": regions, "graphs": len(graphs), "nodes": sum(graphs), "trace_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--dynamic", action="store_true", help="also count with dynamic shapes")
    parser.add_argument("--tiny", action="store_true", help="svdq's tiny test UNet instead of SVD-XT's")
    args = parser.parse_args(argv)
    unet = build_unet(args.tiny)
    common = {
        "bench": "unet_graphs",
        "machine": platform.node(),
        "model": "tiny" if args.tiny else "SVD-XT architecture",
        "size": f"{args.width}x{args.height}",
        "frames": args.frames,
        "torch": torch.__version__,
    }
    for dynamic in (False, True) if args.dynamic else (False,):
        found = count_graphs(unet, args.width, args.height, args.frames, dynamic)
        shapes = "dynamic" if dynamic else "static"
        for figure in ("regions", "graphs", "nodes"):
            print(json.dumps({**common, "shapes": shapes, "figure": figure, "value": found[figure]}))
        reuse = found["regions"] / found["graphs"]
        print(json.dumps({**common, "shapes": shapes, "figure": "regions_per_graph", "value": round(reuse, 3)}))
        print(json.dumps({**common, "shapes": shapes, "figure": "trace_seconds", "value": round(found["trace_s"], 2)}))


if __name__ == "__main__":
    main()
