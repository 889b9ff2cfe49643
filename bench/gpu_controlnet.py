#!/usr/bin/env python3
"""ControlNet units on the full-size SDXL architecture: writes two random full-size SDXL
ControlNets next to the random SDXL base that bench/gpu_full.py writes (no download): one
copied from the UNet's encoder (diffusers' `ControlNetModel.from_unet`, as the published
canny/depth SDXL ControlNets are shaped) and a union model of the published layout, with
the zero-initialised layers given small random weights. Then, in the same run:

  - `sdxld bench-controlnet`: the time per denoising step with no unit, one and two, as
    ratios to a step without (target: one unit at most 1.6x);
  - diffusers on the same weights and dtype: StableDiffusionXLPipeline against
    StableDiffusionXLControlNetPipeline with the first ControlNet, per step (a run of
    --steps less a run of one step), for the same ratio.

  python3 bench/gpu_controlnet.py --sdxld PATH [--model /tmp/sdxl-random] [--dtype bfloat16]
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def randomise_zero_layers(controlnet, seed: int):
    """Small random weights where diffusers starts at zero, so residuals are not zeros."""
    gen = torch.Generator().manual_seed(seed)
    layers = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    if hasattr(controlnet, "spatial_ch_projs"):
        layers.append(controlnet.spatial_ch_projs)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)


def write_controlnets(model: Path, out: Path):
    from diffusers import ControlNetModel, ControlNetUnionModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float16)
    full = ControlNetModel.from_unet(unet.float(), conditioning_embedding_out_channels=(16, 32, 96, 256))
    randomise_zero_layers(full, 1)
    full.to(torch.float16).save_pretrained(out / "canny_full", safe_serialization=True)
    union = ControlNetUnionModel.from_unet(unet.float(), conditioning_embedding_out_channels=(16, 32, 96, 256))
    randomise_zero_layers(union, 2)
    union.to(torch.float16).save_pretrained(out / "union_full", safe_serialization=True)
    edges = np.zeros((1024, 1024, 3), dtype=np.uint8)
    edges[::37, :] = 255
    edges[:, ::53] = 255
    Image.fromarray(edges).save(out / "edges.png")


def diffusers_step_ratio(model: Path, controlnet: Path, image: Path, dtype, steps: int) -> dict:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype).to("cuda")
    base.set_progress_bar_config(disable=True)
    cn = ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype).to("cuda")
    controlled = StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=cn)
    control = Image.open(image).convert("RGB")

    def run(pipe, n, **extra):
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(prompt="a lighthouse", num_inference_steps=n, width=1024, height=1024, output_type="latent",
             generator=torch.Generator("cuda").manual_seed(0), **extra)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def per_step(pipe, **extra):
        run(pipe, 2, **extra)
        return (run(pipe, steps, **extra) - run(pipe, 1, **extra)) / (steps - 1)

    none = per_step(base)
    one = per_step(controlled, image=control)
    return {"diffusers_step_s": {"none": none, "one": one}, "diffusers_step_ratio_one": one / none}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--model", default="/tmp/sdxl-random", type=Path)
    parser.add_argument("--out", default="/tmp/sdxl-controlnets", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    write_controlnets(args.model, args.out)
    image = args.out / "edges.png"
    result = subprocess.run(
        [args.sdxld, "bench-controlnet", "--model", str(args.model), "--device", "cuda", "--dtype", args.dtype,
         "--controlnet", f"{args.out / 'canny_full'},{image}",
         "--controlnet", f"{args.out / 'union_full'},{image},type=canny",
         "--prompt", "a lighthouse", "--steps", str(args.steps), "--width", "1024", "--height", "1024",
         "--runs", str(args.runs), "--threads", "0"],
        check=False, capture_output=True, text=True)
    print(result.stdout.strip() or result.stderr.strip()[-2000:])
    dtype = getattr(torch, args.dtype)
    print(json.dumps(diffusers_step_ratio(args.model, args.out / "canny_full", image, dtype, args.steps)))


if __name__ == "__main__":
    main()
