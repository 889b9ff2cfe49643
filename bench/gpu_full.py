#!/usr/bin/env python3
"""Full-size SDXL on a GPU: writes the stabilityai SDXL base architecture with random
weights (no download: the configs are below), then times diffusers (eager, SDPA) and
`sdxld bench` on it: 1024x1024, 30 steps, CFG 5, batch 1, one dtype, median of N runs
after a warm-up, both end to end from prompt to 8-bit image. Also prints diffusers'
peak allocated GPU memory and each process's peak GPU memory as nvidia-smi sees it.

  python3 bench/gpu_full.py --sdxld PATH --vocab DIR [--dtype bfloat16] [--runs 3]
"""

import argparse
import json
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


def write_model(out: Path, vocab: Path, dtype):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
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
    torch.cuda.empty_cache()
    return params


class GpuMemoryWatch:
    """Polls nvidia-smi's memory.used (MiB) while a block runs; keeps the peak."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
            try:
                self.peak = max(self.peak, int(out.split()[0]))
            except (ValueError, IndexError):
                pass
            time.sleep(0.05)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def time_diffusers(model: Path, args, dtype):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def once():
        return pipe(
            prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=5.0, width=1024, height=1024,
            generator=[torch.Generator("cpu").manual_seed(1)], output_type="np",
        ).images

    once()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        images = once()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    finite = bool(torch.from_numpy(images).isfinite().all())
    peak = torch.cuda.max_memory_allocated()
    del pipe
    torch.cuda.empty_cache()
    return statistics.median(times), times, peak, finite


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--vocab", required=True, type=Path)
    parser.add_argument("--model", default="/tmp/sdxl-random", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompt", default="a photograph of a lighthouse at dusk")
    parser.add_argument("--write-only", action="store_true", help="only write the model")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(torch.cuda.get_device_name(0), f"torch {torch.__version__}", flush=True)
    if not (args.model / "model_index.json").exists():
        start = time.perf_counter()
        params = write_model(args.model, args.vocab, dtype)
        print(f"wrote the random full-size SDXL base ({params / 1e9:.2f} B UNet parameters) in {time.perf_counter() - start:.0f} s", flush=True)
    if args.write_only:
        return 0

    cmd = [args.sdxld, "bench", "--model", str(args.model), "--device", "cuda", "--dtype", args.dtype,
           "--prompt", args.prompt, "--steps", str(args.steps), "--guidance", "5", "--width", "1024",
           "--height", "1024", "--seed", "1", "--runs", str(args.runs), "--threads", "0"]
    with GpuMemoryWatch() as sdxld_memory:
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        print("sdxld bench failed:", run.stderr[-2000:], flush=True)
        sdxld = None
    else:
        sdxld = json.loads(run.stdout.strip().splitlines()[-1])
        allocator = sdxld.get("peak_device_memory_bytes")
        allocator = f"{allocator / 2**30:.2f} GiB" if allocator else "n/a"
        print(f"sdxld {args.dtype}: median {sdxld['median_s']:.3f} s, runs {[round(t, 3) for t in sdxld['runs_s']]}, "
              f"allocator peak {allocator}, nvidia-smi peak {sdxld_memory.peak / 1024:.2f} GiB", flush=True)

    with GpuMemoryWatch() as diffusers_memory:
        median, times, peak, finite = time_diffusers(args.model, args, dtype)
    print(f"diffusers {args.dtype} (eager, SDPA): median {median:.3f} s, runs {[round(t, 3) for t in times]}, "
          f"max_memory_allocated {peak / 2**30:.2f} GiB, nvidia-smi peak {diffusers_memory.peak / 1024:.2f} GiB, finite={finite}", flush=True)
    if sdxld:
        print(f"ratio diffusers / sdxld = {median / sdxld['median_s']:.2f}x (target >= 1.6x); "
              f"sdxld end to end {sdxld['median_s']:.3f} s (target <= 1.2 s on an H100)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
