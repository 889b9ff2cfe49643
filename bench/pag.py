#!/usr/bin/env python3
"""Perturbed-attention guidance benchmark: the same tiny SDXL pipeline, seed and settings
through diffusers' StableDiffusionXLPAGPipeline and through `sdxld bench --pag`, one CPU
thread each, median of N runs each; and both without PAG for what the third UNet batch
part adds.

Prints the four medians, the ratio diffusers / sdxld with PAG (above 1 means sdxld is
faster) and what PAG adds to a generation in each.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

LAYERS = ["mid", "up_blocks.0"]


def median_of(runs: int, once) -> float:
    once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_diffusers(args, pag: bool) -> float:
    from diffusers import StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline

    if pag:
        pipe = StableDiffusionXLPAGPipeline.from_pretrained(args.model, torch_dtype=torch.float32, enable_pag=True, pag_applied_layers=LAYERS)
        extra = dict(pag_scale=args.pag_scale)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
        extra = {}
    pipe.set_progress_bar_config(disable=True)

    def once():
        generator = [torch.Generator("cpu").manual_seed(args.seed)]
        return pipe(
            prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
            width=args.width, height=args.height, generator=generator, output_type="np", **extra,
        ).images

    return median_of(args.runs, once)


def time_sdxld(args, pag: bool) -> float:
    cmd = [
        args.sdxld, "bench", "--model", args.model, "--prompt", args.prompt,
        "--steps", str(args.steps), "--guidance", str(args.guidance),
        "--width", str(args.width), "--height", str(args.height), "--seed", str(args.seed),
        "--runs", str(args.runs), "--threads", "1",
    ]
    if pag:
        cmd += ["--pag", str(args.pag_scale)]
        for layer in LAYERS:
            cmd += ["--pag-layer", layer]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a diffusers SDXL folder")
    p.add_argument("--sdxld", required=True, help="the sdxld binary")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--pag-scale", type=float, default=3.0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a lighthouse on a rocky coast at dusk")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    medians = {}
    for pag in (False, True):
        medians[("diffusers", pag)] = time_diffusers(args, pag)
        medians[("sdxld", pag)] = time_sdxld(args, pag)
    print(f"model {args.model}: {args.steps} steps, {args.width}x{args.height}, CFG {args.guidance}, PAG {args.pag_scale} on {' '.join(LAYERS)}, 1 CPU thread, median of {args.runs}")
    for who in ("diffusers", "sdxld"):
        plain, pag = medians[(who, False)], medians[(who, True)]
        print(f"  {who:9} {plain * 1000:8.1f} ms without PAG, {pag * 1000:8.1f} ms with (x{pag / plain:.2f})")
    ratio = medians[("diffusers", True)] / medians[("sdxld", True)]
    print(f"  speed-up with PAG (diffusers / sdxld): {ratio:.2f}x   target >= 1.25x")


if __name__ == "__main__":
    sys.exit(main())
