#!/usr/bin/env python3
"""End-to-end benchmark: the same tiny SDXL pipeline, prompt, seed and settings through
diffusers and through `sdxld bench`, one CPU thread each, median of N runs each.

Prints both medians and the ratio diffusers / sdxld (above 1 means sdxld is faster).
--scheduler runs both with another scheduler (a diffusers class name, as
`from_config(model config)` builds it; sdxld gets the same class by its short name).
--tiling runs both seamless along both axes (every Conv2d of diffusers' UNet and VAE with
padding_mode "circular", as A1111's Tiling sets it; sdxld with --tiling both).
--guider cfg,start=S,stop=E runs both with classifier-free guidance within that interval
of steps: diffusers' modular SDXL pipeline with its ClassifierFreeGuidance guider (which
runs the prompt's batch alone outside the interval), sdxld with the same --guider.
With --cuda it also runs both on the GPU in float32 and prints the largest latent
difference (a check to run by hand on a GPU machine).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def guider_options(spec):
    """start and stop of a `cfg,start=S,stop=E` guider."""
    kind, *options = spec.split(",")
    if kind != "cfg":
        raise SystemExit("--guider: only cfg,start=S,stop=E is benchmarked")
    values = dict(option.split("=", 1) for option in options)
    return dict(start=float(values.pop("start", 0.0)), stop=float(values.pop("stop", 1.0)), **values)


def modular(pipe, args):
    """pipe's components in diffusers' modular SDXL pipeline under args' guider."""
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

    def guider():
        return ClassifierFreeGuidance(guidance_scale=args.guidance, **guider_options(args.guider))

    mp = StableDiffusionXLAutoBlocks().init_pipeline()
    mp.update_components(
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        unet=pipe.unet,
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        guider=guider(),
    )

    def run(**inputs):
        # A guider keeps state from its last call that breaks the next (diffusers
        # 0.42.1): a fresh one per call, about half a millisecond.
        mp.update_components(guider=guider())
        return mp(**inputs, output="images")

    return run


def time_diffusers(model, args, device="cpu"):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
    if args.tiling:
        for model in (pipe.unet, pipe.vae):
            for layer in model.modules():
                if isinstance(layer, torch.nn.Conv2d):
                    layer.padding_mode = "circular"

    # A guider's modular pipeline takes its guidance scale from the guider.
    if args.guider:
        run, extra = modular(pipe, args), {}
    else:
        run, extra = (lambda **inputs: pipe(**inputs).images), dict(guidance_scale=args.guidance)

    def once():
        gen = [torch.Generator("cpu").manual_seed(args.seed)]
        return run(
            prompt=args.prompt,
            num_inference_steps=args.steps,
            width=args.width,
            height=args.height,
            generator=gen,
            output_type="np",
            **extra,
        )

    once()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        once()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def sdxld_command(args, model, sub, device="cpu"):
    return [
        args.sdxld, sub, "--model", model, "--prompt", args.prompt,
        "--steps", str(args.steps), "--guidance", str(args.guidance),
        "--width", str(args.width), "--height", str(args.height),
        "--seed", str(args.seed), "--device", device,
    ] + (["--scheduler", SHORT_NAMES[args.scheduler]] if args.scheduler else []) + (
        ["--tiling", "both"] if args.tiling else []
    ) + (["--guider", args.guider] if args.guider else [])


# sdxld's short names of the diffusers classes --scheduler may name.
SHORT_NAMES = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-ancestral",
    "DPMSolverMultistepScheduler": "dpm-solver-multistep",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}


def time_sdxld(model, args):
    cmd = sdxld_command(args, model, "bench") + ["--runs", str(args.runs), "--threads", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["median_s"], result["runs_s"]


def cuda_check(model, args):
    """Largest |sdxld - diffusers| of the final latents on CUDA (or --check-device), in
    --check-dtype (float32: within 1e-3 relative; half precision: each set of flags near
    the plain layout's own rounding difference), for sdxld in the plain layout and with
    each set of --cuda-flags; a failed sdxld run is reported and the next one tried."""
    import tempfile
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    device, dtype = args.check_device, args.check_dtype
    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        width=args.width, height=args.height,
        generator=[torch.Generator("cpu").manual_seed(args.seed)], output_type="latent",
    ).images.float().cpu()
    import numpy as np
    from PIL import Image

    plain_image = None
    for flags in [""] + [f for f in args.cuda_flags.split(";") if f]:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/l.safetensors"
            cmd = sdxld_command(args, model, "generate", device) + ["--dtype", dtype] + flags.split()
            cmd += ["--output", f"{tmp}/o.png", "--latents-out", path]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{device} {dtype} {flags or '(plain layout)'}: sdxld failed: {run.stderr[-2000:]}", flush=True)
                continue
            ours = load_file(path)["latents"].float()
            image = np.asarray(Image.open(f"{tmp}/o.png")).astype(int)
        plain_image = image if plain_image is None else plain_image
        levels = int(np.abs(image - plain_image).max())
        diff = (ours - latents).abs().max().item()
        target = "target <= 1e-3" if dtype == "float32" else "near the plain layout's"
        print(f"{device} {dtype} {flags or '(plain layout)'}: max |sdxld - diffusers| = {diff:.3e} "
              f"(relative {diff / latents.abs().max().item():.3e}, {target}), finite={bool(ours.isfinite().all())}, "
              f"image within {levels} levels of the plain layout's", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a diffusers SDXL folder")
    p.add_argument("--sdxld", required=True, help="the sdxld binary")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    p.add_argument("--scheduler", choices=sorted(SHORT_NAMES), help="a diffusers scheduler class (default: the model's)")
    p.add_argument("--tiling", action="store_true", help="both seamless along both axes")
    p.add_argument("--guider", help="cfg,start=S,stop=E: classifier-free guidance within that interval of steps")
    p.add_argument("--cuda", action="store_true", help="also compare on CUDA (float32)")
    p.add_argument("--cuda-only", action="store_true", help="only the CUDA comparison")
    p.add_argument("--cuda-flags", default="", help="FLAGS;FLAGS...: sdxld flags compared on CUDA too")
    p.add_argument("--check-device", default="cuda", help="where the CUDA comparison runs (cpu: a dry run)")
    p.add_argument("--check-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    if args.cuda_only:
        cuda_check(args.model, args)
        return 0

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    base, base_runs = time_diffusers(args.model, args)
    ours, our_runs = time_sdxld(args.model, args)
    scheduler = f", {args.scheduler}" if args.scheduler else ""
    scheduler += ", seamless tiling" if args.tiling else ""
    scheduler += f", guider {args.guider}" if args.guider else ""
    print(f"model {args.model}: {args.steps} steps{scheduler}, {args.width}x{args.height}, CFG {args.guidance}, 1 CPU thread, median of {args.runs}")
    print(f"  diffusers {base * 1000:8.1f} ms   runs {[round(t * 1000, 1) for t in base_runs]}")
    print(f"  sdxld     {ours * 1000:8.1f} ms   runs {[round(t * 1000, 1) for t in our_runs]}")
    print(f"  speed-up (diffusers / sdxld): {base / ours:.2f}x   target >= 1.25x")
    if args.cuda:
        cuda_check(args.model, args)


if __name__ == "__main__":
    sys.exit(main())
