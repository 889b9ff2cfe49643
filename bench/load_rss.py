#!/usr/bin/env python3
"""Peak resident memory while sdxld loads a pipeline, against the pipeline's size on disk.

Writes a mid-size random SDXL-architecture pipeline in float32 (the CPU's dtype, so one
copy of the weights in memory is the size on disk), then runs `sdxld generate` (one 64x64
step on the CPU) on it and on the tiny built-in demo model, and prints
(peak RSS - the demo run's peak RSS) / size on disk. The target is at most 1.2.

  python3 bench/load_rss.py --sdxld PATH [--model DIR]
"""

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def write_model(out: Path, vocab: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_full import TE1, UNET, VAE
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)
    te2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=8, num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
    unet = dict(UNET, transformer_layers_per_block=[1, 1, 2], cross_attention_dim=768 + 1280)
    tok = lambda pad: CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token=pad, model_max_length=77)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**common, **TE1)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**common, **te2)),
        tokenizer=tok("<|endoftext|>"), tokenizer_2=tok("!"), unet=UNet2DConditionModel(**unet),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def peak_rss_of(cmd) -> int:
    """Peak resident set (bytes) of a child process, measured by a fresh Python parent."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--vocab", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "sdxld-load-rss-model")
    args = parser.parse_args()
    if not (args.model / "model_index.json").exists():
        write_model(args.model, args.vocab)
    size = sum(f.stat().st_size for f in args.model.rglob("*.safetensors"))
    demo = Path(tempfile.gettempdir()) / "sdxld-load-rss-demo"
    if not (demo / "model_index.json").exists():
        subprocess.run([args.sdxld, "demo-model", "--output", str(demo)], check=True, capture_output=True)
    generate = lambda model: [args.sdxld, "generate", "--model", str(model), "--device", "cpu", "--steps", "1",
                              "--width", "64", "--height", "64", "--seed", "1", "--output", str(Path(tempfile.gettempdir()) / "load-rss.png")]
    baseline = peak_rss_of(generate(demo))
    peak = peak_rss_of(generate(args.model))
    print(f"pipeline on disk {size / 2**30:.2f} GiB (float32); sdxld peak RSS {peak / 2**30:.2f} GiB, "
          f"demo-model run {baseline / 2**30:.2f} GiB; (peak - demo) / size = {(peak - baseline) / size:.2f} (target <= 1.2)")


if __name__ == "__main__":
    sys.exit(main())
