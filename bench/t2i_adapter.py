#!/usr/bin/env python3
"""T2I-Adapter benchmark: the same tiny SDXL pipeline, prompt, seed and settings, without
and with a T2I-Adapter unit, through diffusers (StableDiffusionXLAdapterPipeline; the
plain run through StableDiffusionXLPipeline) and through `sdxld bench --controlnet`, one
CPU thread each, median of N runs each.

Prints the four medians, the ratio diffusers / sdxld with the adapter (above 1 means
sdxld is faster) and what the adapter adds to a generation in each.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def median_of(runs: int, once) -> float:
    once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_diffusers(args, with_adapter: bool) -> float:
    import diffusers
    from PIL import Image

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    extra = {}
    if with_adapter:
        adapter = diffusers.T2IAdapter.from_pretrained(args.adapter)
        pipe = diffusers.StableDiffusionXLAdapterPipeline.from_pipe(pipe, adapter=adapter)
        image = Image.open(args.image)
        image = image.convert("L") if adapter.config.in_channels == 1 else image.convert("RGB")
        extra = dict(image=image, adapter_conditioning_scale=args.scale, adapter_conditioning_factor=args.factor)
    pipe.set_progress_bar_config(disable=True)

    def once():
        return pipe(
            prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
            width=args.width, height=args.height,
            generator=[torch.Generator("cpu").manual_seed(args.seed)], output_type="np", **extra,
        ).images

    return median_of(args.runs, once)


def time_sdxld(args, with_adapter: bool) -> float:
    cmd = [
        args.sdxld, "bench", "--model", args.model, "--prompt", args.prompt,
        "--steps", str(args.steps), "--guidance", str(args.guidance),
        "--width", str(args.width), "--height", str(args.height), "--seed", str(args.seed),
        "--runs", str(args.runs), "--threads", "1",
    ]
    if with_adapter:
        cmd += ["--controlnet", f"{args.adapter},{args.image},scale={args.scale},end={args.factor}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a diffusers SDXL folder")
    p.add_argument("--adapter", required=True, help="a diffusers T2IAdapter folder for it")
    p.add_argument("--image", required=True, help="the control map, at the output size")
    p.add_argument("--sdxld", required=True, help="the sdxld binary")
    p.add_argument("--scale", type=float, default=0.9)
    p.add_argument("--factor", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a house by a lake")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    print(f"model {args.model}, adapter {args.adapter}: {args.steps} steps, {args.width}x{args.height}, CFG {args.guidance}, 1 CPU thread, median of {args.runs}")
    # Rounds of all four measurements, so that a slower spell of a shared machine
    # falls on all of them alike.
    for round in range(args.rounds):
        medians = {}
        for with_adapter in (False, True):
            medians[("diffusers", with_adapter)] = time_diffusers(args, with_adapter)
            medians[("sdxld", with_adapter)] = time_sdxld(args, with_adapter)
        print(f" round {round + 1}")
        for who in ("diffusers", "sdxld"):
            plain, adapted = medians[(who, False)], medians[(who, True)]
            print(f"  {who:9} {plain * 1000:8.1f} ms without, {adapted * 1000:8.1f} ms with the adapter ({(adapted - plain) * 1000:+.1f} ms, {adapted / plain:.3f}x)")
        ratio = medians[("diffusers", True)] / medians[("sdxld", True)]
        print(f"  speed-up with the adapter (diffusers / sdxld): {ratio:.2f}x   target >= 1.25x")


if __name__ == "__main__":
    sys.exit(main())
