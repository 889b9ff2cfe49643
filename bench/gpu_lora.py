#!/usr/bin/env python3
"""LoRA adapters on the full-size SDXL architecture: writes three random LoRA files shaped
like those users get (no download), then runs `sdxld bench-lora` on the random SDXL base
that bench/gpu_full.py writes: the time per denoising step with no adapter, one and three,
and the cost of switching adapter sets, in both application modes.

  - style.safetensors      diffusers/PEFT, rank 32: UNet attention projections and both
                           text encoders' attention
  - character.safetensors  kohya-ss, rank 16, alpha 8: UNet attention, feed-forward and
                           proj_in/proj_out in sgm names, both text encoders
  - detail.safetensors     kohya-ss LoCon, rank 8: UNet attention and ResNet convolutions

  python3 bench/gpu_lora.py --sdxld PATH [--model /tmp/sdxl-random] [--dtype bfloat16]
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_full import TE1, TE2, UNET  # noqa: E402

RESNET_SGM = dict(conv1="in_layers.2", conv2="out_layers.3", time_emb_proj="emb_layers.1", conv_shortcut="skip_connection")


def modules(model, suffixes, convs=False):
    for name, module in model.named_modules():
        if not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        if isinstance(module, torch.nn.Linear):
            yield name, (module.in_features,), module.out_features
        elif convs and isinstance(module, torch.nn.Conv2d):
            yield name, (module.in_channels, *module.kernel_size), module.out_channels


def pairs(model, suffixes, rank, convs=False):
    out = {}
    for name, down_tail, out_features in modules(model, suffixes, convs):
        up_tail = (1, 1) if len(down_tail) == 3 else ()
        out[name] = (torch.randn(rank, *down_tail, dtype=torch.float16) * 0.01, torch.randn(out_features, rank, *up_tail, dtype=torch.float16) * 0.01)
    return out


def sgm(name, lpb=2):
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        b, kind, l, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        index = 1 + b * (lpb + 1) + l if parts[0] == "down_blocks" else b * (lpb + 1) + l
        block = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
        if kind == "resnets":
            return f"{block}.{index}.0.{RESNET_SGM[rest[0]]}"
        return f"{block}.{index}.1.{'.'.join(rest)}"
    kind, l, rest = parts[1], int(parts[2]), parts[3:]
    if kind == "resnets":
        return f"middle_block.{2 * l}.{RESNET_SGM[rest[0]]}"
    return f"middle_block.1.{'.'.join(rest)}"


def kohya(prefix, layers, alpha, rename=lambda n: n):
    out = {}
    for name, (down, up) in layers.items():
        flat = prefix + rename(name).replace(".", "_")
        out[f"{flat}.lora_down.weight"], out[f"{flat}.lora_up.weight"] = down, up
        out[f"{flat}.alpha"] = torch.tensor(float(alpha))
    return out


def peft(prefix, layers):
    out = {}
    for name, (down, up) in layers.items():
        out[f"{prefix}.{name}.lora_A.weight"], out[f"{prefix}.{name}.lora_B.weight"] = down, up
    return out


def write_loras(folder: Path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
        te1 = CLIPTextModel(CLIPTextConfig(**common, **TE1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **TE2))
    attention = ("to_q", "to_k", "to_v", "to_out.0")
    te_attention = ("q_proj", "k_proj", "v_proj", "out_proj")
    torch.manual_seed(0)
    style = peft("unet", pairs(unet, attention, 32))
    style.update(peft("text_encoder", pairs(te1, te_attention, 32)))
    style.update(peft("text_encoder_2", pairs(te2, te_attention, 32)))
    save_file(style, str(folder / "style.safetensors"))
    character = kohya("lora_unet_", pairs(unet, attention + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"), 16), 8, sgm)
    character.update(kohya("lora_te1_", pairs(te1, te_attention + ("fc1", "fc2"), 16), 8))
    character.update(kohya("lora_te2_", pairs(te2, te_attention + ("fc1", "fc2"), 16), 8))
    save_file(character, str(folder / "character.safetensors"))
    detail = kohya("lora_unet_", pairs(unet, attention + ("conv1", "conv2"), 8, convs=True), 8, sgm)
    save_file(detail, str(folder / "detail.safetensors"))
    for f in sorted(folder.iterdir()):
        print(f"{f.name}: {f.stat().st_size / 2**20:.0f} MiB", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--model", default="/tmp/sdxl-random", type=Path)
    parser.add_argument("--loras", default="/tmp/sdxl-loras", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    write_loras(args.loras)
    print(f"wrote the LoRAs in {time.perf_counter() - start:.0f} s", flush=True)
    cmd = [args.sdxld, "bench-lora", "--model", str(args.model), "--device", "cuda", "--dtype", args.dtype,
           "--prompt", "a photograph of a lighthouse at dusk", "--steps", str(args.steps), "--guidance", "5",
           "--width", "1024", "--height", "1024", "--seed", "1", "--runs", str(args.runs), "--threads", "0",
           "--lora-dir", str(args.loras), "--lora", "style:0.8", "--lora", "character:0.7", "--lora", "detail:0.5"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    print(run.stdout, flush=True)
    if run.returncode != 0:
        print("sdxld bench-lora failed:", run.stderr[-3000:], flush=True)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
