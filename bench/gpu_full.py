#!/usr/bin/env python3
"""Full-size SDXL on a GPU: writes the stabilityai SDXL base architecture with random
weights (no download: the configs are below), then times diffusers (eager, SDPA) and
`sdxld bench` on it, both end to end from prompt to 8-bit image, CFG 5, one dtype,
median of N runs after a warm-up, for each size and batch asked (batch 1 runs --steps
steps, larger batches --batch-steps, as throughput is quoted at 20). For each it prints
the times, images per second, the allocators' peaks, and with --profile the stages of
one more run of each side, timed by CUDA events (sdxld's from its shim, diffusers' from
module hooks): text encoders, each UNet call by level and layer type, VAE decode,
image encoding, side by side, written as folded stacks under --out for flame graphs.
The first size and batch comes first, then the --variants against it, then the rest.

  python3 bench/gpu_full.py --sdxld PATH --vocab DIR [--dtype bfloat16] [--runs 3]
      [--sizes 1024,768] [--batches 1,4] [--profile] [--out DIR] [--device cuda]

`--device cpu` runs the same script on the CPU (host clock instead of CUDA events, no
allocator peaks): a dry run of every path of the script before GPU time is spent, e.g.
on a fixture pipeline with `--model DIR --sizes 256 --steps 2 --runs 1`.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    in_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
TE1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
TE2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


class HostMark:
    """A host clock reading with CUDA events' interface, for --device cpu (the CPU's
    operations have finished when they return)."""

    def __init__(self):
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3


class Accelerator:
    """The few device calls the script makes, on CUDA or (for a dry run) the CPU."""

    def __init__(self, name: str):
        self.name = name
        self.cuda = name == "cuda"

    def describe(self):
        return torch.cuda.get_device_name(0) if self.cuda else "CPU (dry run)"

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()

    def empty_cache(self):
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def event(self):
        return torch.cuda.Event(enable_timing=True) if self.cuda else HostMark()


DEVICE = Accelerator("cuda")


def write_model(out: Path, vocab: Path, dtype):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(DEVICE.name):
        common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)
        te1 = CLIPTextModel(CLIPTextConfig(**common, **TE1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **TE2))
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
    )
    tok = lambda pad: CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token=pad, model_max_length=77)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok("<|endoftext|>"), tokenizer_2=tok("!"),
        unet=unet, scheduler=scheduler, add_watermarker=False,
    ).to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in unet.parameters())
    del pipe, unet, vae, te1, te2
    DEVICE.empty_cache()
    return params


def smi_used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    try:
        return int(out.split()[0])
    except (ValueError, IndexError):
        return 0


class GpuMemoryWatch:
    """Polls nvidia-smi's memory.used (MiB) while a block runs; keeps the peak above what
    was in use when it began (this script's own diffusers pipeline)."""

    def __init__(self):
        self.peak = 0
        self._base = 0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, smi_used_mib() - self._base)
            time.sleep(0.05)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        if shutil.which("nvidia-smi"):
            self._base = smi_used_mib()
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class HookProfiler:
    """Stages of diffusers' pipeline timed by CUDA events from module hooks, named as
    sdxld's profile names them (paths joined by `;`), without syncs inside the loop. The
    hooks are attached only for the profiled run (they cost time in Python)."""

    def __init__(self, pipe):
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        self.pipe, self.stack, self.spans, self.enabled = pipe, [], [], False
        self.handles, self.originals = [], []
        unet = pipe.unet
        named = [(unet, "unet"), (unet.time_embedding, "time_embedding"), (unet.mid_block, "mid"), (unet.conv_out, "conv_out")]
        named += [(b, f"down{i}") for i, b in enumerate(unet.down_blocks)]
        named += [(b, f"up{i}") for i, b in enumerate(unet.up_blocks)]
        kinds = {ResnetBlock2D: "resnet", Downsample2D: "downsample", Upsample2D: "upsample", Transformer2DModel: "transformer"}
        for model in (unet, pipe.vae):
            for module in model.modules():
                for kind, name in kinds.items():
                    if isinstance(module, kind):
                        named.append((module, name))
                if isinstance(module, BasicTransformerBlock):
                    named += [(module.attn1, "self_attention"), (module.attn2, "cross_attention"), (module.ff, "feed_forward")]
        self.named = named

    def attach(self):
        for module, name in self.named:
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self.push(name)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self.pop()))
        pipe = self.pipe
        for obj, attr, name in [(pipe, "encode_prompt", "text_encoders"), (pipe.vae, "decode", "vae_decode"), (pipe.scheduler, "step", "scheduler")]:
            original = getattr(obj, attr)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                self.push(_name)
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.pop()

            self.originals.append((obj, attr, original))
            setattr(obj, attr, wrapped)
        self.spans, self.stack, self.enabled = [], [], True

    def detach(self):
        self.enabled = False
        for handle in self.handles:
            handle.remove()
        for obj, attr, original in self.originals:
            # The originals are bound methods found on the class: drop the instance's wrapper.
            if attr in vars(obj):
                delattr(obj, attr)
        self.handles, self.originals = [], []

    def push(self, name):
        if self.enabled:
            event = DEVICE.event()
            event.record()
            self.stack.append((name, event))

    def pop(self):
        if self.enabled and self.stack:
            end = DEVICE.event()
            end.record()
            name, start = self.stack.pop()
            self.spans.append((";".join([n for n, _ in self.stack] + [name]), start, end))

    def stages(self):
        """Per path: count, total_ms, self_ms (after a synchronize)."""
        DEVICE.synchronize()
        stages = {}
        for path, start, end in self.spans:
            entry = stages.setdefault(path, {"count": 0, "total_ms": 0.0})
            entry["count"] += 1
            entry["total_ms"] += start.elapsed_time(end)
        for path, entry in stages.items():
            inner = sum(e["total_ms"] for p, e in stages.items() if p.startswith(path + ";") and ";" not in p[len(path) + 1:])
            entry["self_ms"] = max(0.0, entry["total_ms"] - inner)
        return stages


def diffusers_pipe(model: Path, dtype):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype).to(DEVICE.name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_diffusers(pipe, args, size, batch, steps, profile):
    """Median seconds, runs, allocator peak, finite, images/s, and with `profile` the
    stages of one more run (its PNG encoding included)."""
    import io

    def once():
        return pipe(
            prompt=args.prompt, num_inference_steps=steps, guidance_scale=5.0, width=size, height=size,
            num_images_per_prompt=batch, generator=[torch.Generator("cpu").manual_seed(1 + i) for i in range(batch)],
            output_type="np",
        ).images

    once()
    DEVICE.synchronize()
    DEVICE.reset_peak()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        images = once()
        DEVICE.synchronize()
        times.append(time.perf_counter() - start)
    finite = bool(torch.from_numpy(images).isfinite().all())
    peak = DEVICE.peak()
    stages = None
    if profile:
        from PIL import Image

        profile.attach()
        images = once()
        profile.push("image_encode")
        for image in images:
            Image.fromarray((image * 255).round().astype("uint8")).save(io.BytesIO(), format="PNG")
        profile.pop()
        profile.detach()
        stages = profile.stages()
    median = statistics.median(times)
    return dict(median_s=median, runs_s=times, peak=peak, finite=finite, images_per_s=batch / median, stages=stages)


def time_sdxld(args, size, batch, steps, folded, flags=()):
    cmd = [args.sdxld, "bench", *flags, "--model", str(args.model), "--device", DEVICE.name, "--dtype", args.dtype,
           "--prompt", args.prompt, "--steps", str(steps), "--guidance", "5", "--width", str(size),
           "--height", str(size), "--seed", "1", "--runs", str(args.runs), "--threads", "0",
           "--num-images", str(batch), "--batch", "together"]
    if folded:
        cmd += ["--profile", str(folded)]
    with GpuMemoryWatch() as watch:
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        print("sdxld bench failed:", run.stderr[-2000:], flush=True)
        return None
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["smi_peak_gib"] = watch.peak / 1024
    result["images_per_s"] = batch / result["median_s"]
    return result


def per_run(stages, name):
    entry = (stages or {}).get(name)
    return entry["total_ms"] if entry else None


def print_stages(sdxld, diffusers, steps, labels=("sdxld ms", "diffusers ms")):
    """Side by side: the outer stages, the UNet per step by level, and the UNet's time
    per layer type (summed over levels), in ms; sdxld's paths lose `denoise_step;`."""
    def normal(stages):
        return {p.removeprefix("denoise_step;"): e for p, e in (stages or {}).items() if p != "denoise_step"}

    ours, theirs = normal(sdxld), normal(diffusers)
    unet_levels = sorted({p for p in set(ours) | set(theirs) if p.startswith("unet;") and p.count(";") == 1})
    rows = [(name, 1) for name in ["text_encoders", "unet", "scheduler", "vae_decode", "image_encode"]]
    # (text encoders, VAE decode and image encoding once per run; UNet and scheduler over all steps)
    rows += [(p, steps) for p in unet_levels]

    def by_kind(stages):
        totals = {}
        for path, entry in stages.items():
            parts = path.split(";")
            if parts[0] == "unet" and len(parts) >= 3:
                key = ";".join(parts[2:])
                totals[key] = totals.get(key, 0.0) + entry["self_ms"]
        return totals

    print(f"{'stage':<42}{labels[0]:>12}{labels[1]:>14}{'ratio':>8}")
    for name, per in rows:
        a, b = per_run(ours, name), per_run(theirs, name)
        fa = f"{a / per:12.2f}" if a is not None else f"{'-':>12}"
        fb = f"{b / per:14.2f}" if b is not None else f"{'-':>14}"
        ratio = f"{b / a:8.2f}" if a and b else f"{'':>8}"
        print(f"{name + (' (per step)' if per > 1 else ''):<42}{fa}{fb}{ratio}", flush=True)
    step = ours.get("unet")
    if step and step["total_ms"] > 0 and DEVICE.cuda:
        device_ms, host_ms = step["total_ms"] / step["count"], step.get("host_ms", 0.0) / step["count"]
        verdict = "launch-bound: CUDA graphs would pay" if host_ms > 0.8 * device_ms else "device-bound"
        print(f"{labels[0]} UNet call: {device_ms:.2f} ms on the device, {host_ms:.2f} ms of host time "
              f"queueing it ({verdict}; host times include the profile's own event records)", flush=True)
    kinds_a, kinds_b = by_kind(ours), by_kind(theirs)
    print("UNet time per step by layer type (own time, all levels):")
    for key in sorted(set(kinds_a) | set(kinds_b), key=lambda k: -kinds_a.get(k, 0.0)):
        a, b = kinds_a.get(key), kinds_b.get(key)
        print(f"  {key:<40}{(a or 0) / steps:12.2f}{(b or 0) / steps:14.2f}{(b / a if a and b else 0):8.2f}", flush=True)


def write_folded(stages, path):
    with open(path, "w") as f:
        for stage, entry in sorted(stages.items()):
            f.write(f"{stage} {round(entry['self_ms'] * 1000)}\n")


def compare(pipe, profiler, args, size, batch):
    """sdxld and diffusers at one size and batch, side by side; sdxld's result."""
    steps = args.steps if batch == 1 else args.batch_steps
    folded = args.out / f"sdxld-{size}-b{batch}.folded" if args.profile else None
    ours = time_sdxld(args, size, batch, steps, folded)
    theirs = time_diffusers(pipe, args, size, batch, steps, profiler)
    print(f"== {size}x{size} batch {batch}, {steps} steps, {args.dtype}", flush=True)
    print(f"diffusers (eager, SDPA): median {theirs['median_s']:.3f} s, runs {[round(t, 3) for t in theirs['runs_s']]}, "
          f"{theirs['images_per_s']:.2f} images/s, max_memory_allocated {theirs['peak'] / 2**30:.2f} GiB, finite={theirs['finite']}", flush=True)
    if ours:
        peak = ours.get("peak_device_memory_bytes")
        print(f"sdxld: median {ours['median_s']:.3f} s, runs {[round(t, 3) for t in ours['runs_s']]}, "
              f"{ours['images_per_s']:.2f} images/s, allocator peak {peak / 2**30 if peak else float('nan'):.2f} GiB, "
              f"nvidia-smi peak {ours['smi_peak_gib']:.2f} GiB above the baseline", flush=True)
        print(f"ratio diffusers / sdxld = {theirs['median_s'] / ours['median_s']:.2f}x", flush=True)
    if args.profile:
        write_folded(theirs["stages"], args.out / f"diffusers-{size}-b{batch}.folded")
        print_stages(ours.get("profile") if ours else None, theirs["stages"], steps)
        for name, entry in sorted(((ours or {}).get("profile") or {}).items()):
            if "peak_memory_bytes" in entry:
                print(f"  sdxld peak during {name}: {entry['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    if (size, batch) == (1024, 1):
        print(f"targets: end to end <= 1.2 s at 1024x1024/{args.steps} steps/batch 1, >= 1.6x diffusers, allocator peak <= 8.5 GiB; "
              f">= 1.7 images/s at 20 steps batched", flush=True)
    return ours


def run_variants(args, plain, size, batch):
    """Each --variants entry's sdxld flags at one size and batch against the plain run."""
    steps = args.steps if batch == 1 else args.batch_steps
    for variant in filter(None, args.variants.split(";")):
        name, _, flags = variant.partition("=")
        flags = flags.replace("@TIGHT_BUDGET@", str(tight_budget(args.model)))
        folded = args.out / f"sdxld-{size}-b{batch}-{name}.folded" if args.profile else None
        run = time_sdxld(args, size, batch, steps, folded, flags.split())
        if run and plain:
            peak = run.get("peak_device_memory_bytes") or 0
            print(f"sdxld variant {name} ({flags}) at {size}x{size} batch {batch}: median {run['median_s']:.3f} s "
                  f"against {plain['median_s']:.3f} s plain ({plain['median_s'] / run['median_s']:.3f}x), "
                  f"allocator peak {peak / 2**30:.2f} GiB", flush=True)
            if args.profile:
                print_stages(run.get("profile"), plain.get("profile"), steps, (name, "plain"))


def tight_budget(model: Path):
    """A memory budget that holds every weight of the model but not a 1024² job's
    activations beside them: sdxld then moves the text encoders to the host once the
    prompts are encoded."""
    weights = sum(f.stat().st_size for f in model.rglob("*.safetensors"))
    return weights + 64 * 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--vocab", required=True, type=Path)
    parser.add_argument("--model", default="/tmp/sdxl-random", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-steps", type=int, default=20)
    parser.add_argument("--sizes", default="1024")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--variants", default="",
                        help="NAME=FLAGS;... sdxld bench flags timed at the first size and batch "
                             "against the plain run (e.g. 'cl=--channels-last;fused=--fused-projections'); "
                             "@TIGHT_BUDGET@ stands for a budget that makes sdxld offload the text encoders")
    parser.add_argument("--out", default="/tmp/gpu-full", type=Path)
    parser.add_argument("--prompt", default="a photograph of a lighthouse at dusk")
    parser.add_argument("--write-only", action="store_true", help="only write the model")
    args = parser.parse_args()
    global DEVICE
    DEVICE = Accelerator(args.device)
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    print(DEVICE.describe(), f"torch {torch.__version__}", flush=True)
    if not (args.model / "model_index.json").exists():
        start = time.perf_counter()
        params = write_model(args.model, args.vocab, dtype)
        print(f"wrote the random full-size SDXL base ({params / 1e9:.2f} B UNet parameters) in {time.perf_counter() - start:.0f} s", flush=True)
    if args.write_only:
        return 0

    configs = [(int(size), int(batch)) for size in args.sizes.split(",") for batch in args.batches.split(",")]
    pipe = diffusers_pipe(args.model, dtype)
    profiler = HookProfiler(pipe) if args.profile else None
    # The first size and batch (1024² batch 1: the targets), then the variants against it,
    # then the other sizes and batches: what matters most comes first if time runs out.
    first = compare(pipe, profiler, args, *configs[0])
    run_variants(args, first, *configs[0])
    for size, batch in configs[1:]:
        compare(pipe, profiler, args, size, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
