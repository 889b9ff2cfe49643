#!/usr/bin/env python3
"""Weighted-prompt benchmark: the same tiny SDXL pipeline, seed and settings with a long
prompt (weights above and below 1, two 75-token chunks) and its negative, in compel's
syntax through diffusers given compel's CompelForSDXL embeddings, or (`--syntax a1111`)
in AUTOMATIC1111's through diffusers given A1111's conditioning as
tests/fixtures/make_a1111_prompt_fixtures.py computes it over transformers (computed in
every run, as a service would), and through `sdxld bench --prompt-syntax compel|a1111`,
one CPU thread each, median of N runs each; and both with the plain prompt (truncated)
for what the weighting adds. With `--edits` (A1111's syntax only) the prompt also edits
and alternates words during sampling, and diffusers is given each step's conditioning
through its step-end callback, as the fixture's pipeline cases do. With `--compose`
(A1111's syntax only) a weighted second sub-prompt joins the prompt with `AND`, and
diffusers' UNet runs both sub-prompts and combines them as A1111 does (the fixture's
a1111_unet).

Prints the four medians, the ratio diffusers / sdxld with the weighted prompt (above 1
means sdxld is faster) and what the weighting adds to a generation in each.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT = (
    "a photograph of an old lighthouse on a rocky coast, waves crashing below. "
    "the (evening sky)1.3 glows orange and purple, seagulls circle the tower. "
    "a small red boat is moored in the harbour-- with fishing nets piled on its deck, "
    "(mist)0.7 rolls in from the sea; warm light spills from the keeper's cottage. "
    "highly detailed, sharp focus, 35mm film, golden hour, dramatic clouds, "
    "(award winning)1.2 composition, rule of thirds, long exposure water, "
    "(crisp reflections)1.1 on wet rocks, a (distant storm)0.8 over the horizon."
)
NEGATIVE = "(blurry)1.2, (low quality)0.5, watermark"
# The same prompt in A1111's syntax.
PROMPT_A1111 = (
    "a photograph of an old lighthouse on a rocky coast, waves crashing below. "
    "the (evening sky:1.3) glows orange and purple, seagulls circle the tower. "
    "a small red boat is moored in the harbour [with fishing nets] piled on its deck, "
    "(mist:0.7) rolls in from the sea; warm light spills from the keeper's cottage. "
    "highly detailed, sharp focus, 35mm film, golden hour, dramatic clouds, "
    "(award winning:1.2) composition, rule of thirds, long exposure water, "
    "(crisp reflections:1.1) on wet rocks, a (distant storm:0.8) over the horizon."
)
NEGATIVE_A1111 = "(blurry:1.2), (low quality:0.5), watermark"
# With edits and an alternation: four texts over the steps, a negative that empties.
PROMPT_EDITS = PROMPT_A1111.replace("small red boat", "small [red:blue:0.5] [boat|ship]")
NEGATIVE_EDITS = "[(blurry:1.2), (low quality:0.5), watermark::0.8]"
# A composable prompt: the prompt and a weighted, alternating second sub-prompt.
PROMPT_COMPOSED = PROMPT_A1111 + " AND a small [red|blue] boat in a storm:0.6"


def texts(args):
    if args.edits:
        return PROMPT_EDITS, NEGATIVE_EDITS
    if args.compose:
        return PROMPT_COMPOSED, NEGATIVE_A1111
    return (PROMPT_A1111, NEGATIVE_A1111) if args.syntax == "a1111" else (PROMPT, NEGATIVE)


def conditioner(args, pipe):
    """A function of (prompt, negative) giving the four conditioning tensors."""
    if args.syntax == "a1111":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
        from make_a1111_prompt_fixtures import conditioning

        torch.set_num_threads(1)  # the fixture scripts set their own thread count
        encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]

        def a1111(prompt, negative):
            c = conditioning(pipe, dict(prompt=prompt, negative_prompt=negative), encoders)
            return c["embeds"], c["pooled"], c["negative_embeds"], c["negative_pooled"]

        return a1111
    from compel import CompelForSDXL

    compel = CompelForSDXL(pipe)

    def weighted(prompt, negative):
        c = compel(prompt, negative_prompt=negative)
        return c.embeds, c.pooled_embeds, c.negative_embeds, c.negative_pooled_embeds

    return weighted


def median_of(runs: int, once) -> float:
    once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_diffusers(args, weighted: bool) -> float:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    condition = conditioner(args, pipe)
    prompt, negative = texts(args)
    common = dict(
        num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.width, height=args.height,
        output_type="np",
    )

    def once():
        generator = [torch.Generator("cpu").manual_seed(args.seed)]
        if weighted and (args.edits or args.compose):
            from make_a1111_prompt_fixtures import pipeline_case

            case = dict(
                prompt=prompt, negative_prompt=negative, n=1, width=args.width, height=args.height,
                seed=args.seed, steps=args.steps, guidance=args.guidance,
            )
            return pipeline_case(pipe, case)
        if not weighted:
            return pipe(prompt=prompt, negative_prompt=negative, generator=generator, **common).images
        embeds, pooled, negative_embeds, negative_pooled = condition(prompt, negative)
        return pipe(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled,
            negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled,
            generator=generator, **common,
        ).images

    return median_of(args.runs, once)


def time_sdxld(args, weighted: bool) -> float:
    prompt, negative = texts(args)
    cmd = [
        args.sdxld, "bench", "--model", args.model, "--prompt", prompt, "--negative-prompt", negative,
        "--steps", str(args.steps), "--guidance", str(args.guidance),
        "--width", str(args.width), "--height", str(args.height), "--seed", str(args.seed),
        "--runs", str(args.runs), "--threads", "1",
        "--prompt-syntax", args.syntax if weighted else "plain",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_s"]


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
    p.add_argument("--syntax", choices=["compel", "a1111"], default="compel")
    p.add_argument("--edits", action="store_true", help="A1111's prompt editing and alternation")
    p.add_argument("--compose", action="store_true", help="A1111's composable prompts (AND)")
    args = p.parse_args()
    if (args.edits or args.compose) and args.syntax != "a1111":
        p.error("--edits and --compose are A1111's syntax")

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    medians = {}
    for weighted in (False, True):
        medians[("diffusers", weighted)] = time_diffusers(args, weighted)
        medians[("sdxld", weighted)] = time_sdxld(args, weighted)
    syntax = f"{args.syntax} with edits" if args.edits else args.syntax
    syntax = f"{syntax} with AND" if args.compose else syntax
    print(f"model {args.model}: {args.steps} steps, {args.width}x{args.height}, CFG {args.guidance}, 1 CPU thread, median of {args.runs}")
    for who in ("diffusers", "sdxld"):
        plain, weighted = medians[(who, False)], medians[(who, True)]
        print(f"  {who:9} {plain * 1000:8.1f} ms plain (truncated), {weighted * 1000:8.1f} ms in {syntax}'s syntax (+{(weighted - plain) * 1000:.1f} ms)")
    ratio = medians[("diffusers", True)] / medians[("sdxld", True)]
    print(f"  speed-up with the weighted prompt (diffusers + {syntax} / sdxld): {ratio:.2f}x   target >= 1.25x")


if __name__ == "__main__":
    sys.exit(main())
