#!/usr/bin/env python3
"""IP-Adapter benchmark: the same tiny SDXL pipeline, prompt, seed and settings, without
and with an image prompt, through diffusers (`load_ip_adapter`, `ip_adapter_image`) and
through `sdxld bench --ip-adapter`, one CPU thread each, median of N runs each.

Prints the four medians, the ratio diffusers / sdxld with the image prompt (above 1 means
sdxld is faster) and what the image prompt adds to a generation in each. With `--mask`
the image prompt is regional (diffusers' `ip_adapter_masks` from `IPAdapterMaskProcessor`,
sdxld's `mask=`).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def median_of(runs: int, once) -> tuple:
    once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def time_diffusers(args, with_prompt: bool):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if with_prompt:
        adapter = Path(args.adapter)
        pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
        encoder = CLIPVisionModelWithProjection.from_pretrained(args.encoder)
        size = encoder.config.image_size
        pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
        pipe.set_ip_adapter_scale(args.scale)
        extra = dict(ip_adapter_image=Image.open(args.image))
        if args.mask:
            from diffusers.image_processor import IPAdapterMaskProcessor

            mask = IPAdapterMaskProcessor().preprocess([Image.open(args.mask)], height=args.height, width=args.width)
            extra["cross_attention_kwargs"] = {"ip_adapter_masks": [mask.reshape(1, 1, args.height, args.width)]}

    def once():
        return pipe(
            prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
            width=args.width, height=args.height,
            generator=[torch.Generator("cpu").manual_seed(args.seed)], output_type="np", **extra,
        ).images

    return median_of(args.runs, once)


def time_sdxld(args, with_prompt: bool):
    cmd = [
        args.sdxld, "bench", "--model", args.model, "--prompt", args.prompt,
        "--steps", str(args.steps), "--guidance", str(args.guidance),
        "--width", str(args.width), "--height", str(args.height), "--seed", str(args.seed),
        "--runs", str(args.runs), "--threads", "1",
    ]
    if with_prompt:
        mask = f"mask={args.mask}," if args.mask else ""
        cmd += ["--ip-adapter", f"{args.adapter},{args.encoder},{args.image},{mask}scale={args.scale}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["median_s"], result["runs_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a diffusers SDXL folder")
    p.add_argument("--adapter", required=True, help="an IP-Adapter .safetensors file for it")
    p.add_argument("--encoder", required=True, help="the adapter's CLIP image encoder folder")
    p.add_argument("--image", required=True, help="the image prompt")
    p.add_argument("--sdxld", required=True, help="the sdxld binary")
    p.add_argument("--mask", help="where the image prompt acts (a regional image prompt)")
    p.add_argument("--scale", type=float, default=0.8)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a lighthouse at dusk")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    medians = {}
    for with_prompt in (False, True):
        medians[("diffusers", with_prompt)] = time_diffusers(args, with_prompt)[0]
        medians[("sdxld", with_prompt)] = time_sdxld(args, with_prompt)[0]
    regional = f", regional ({Path(args.mask).name})" if args.mask else ""
    print(f"model {args.model}, adapter {Path(args.adapter).name}{regional}: {args.steps} steps, {args.width}x{args.height}, CFG {args.guidance}, 1 CPU thread, median of {args.runs}")
    for who in ("diffusers", "sdxld"):
        plain, prompted = medians[(who, False)], medians[(who, True)]
        print(f"  {who:9} {plain * 1000:8.1f} ms without, {prompted * 1000:8.1f} ms with the image prompt ({(prompted - plain) * 1000:+.1f} ms)")
    ratio = medians[("diffusers", True)] / medians[("sdxld", True)]
    print(f"  speed-up with the image prompt (diffusers / sdxld): {ratio:.2f}x   target >= 1.25x")


if __name__ == "__main__":
    sys.exit(main())
