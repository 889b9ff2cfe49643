#!/usr/bin/env python3
"""Upscaler benchmark: a full-size RRDBNet x4 (RealESRGAN_x4plus's shape: 64 features,
23 blocks, growth 32), or with `--arch span` a SPAN x4 of 48 features (the published
span models' shape), or with `--arch plksr` a RealPLKSR x4 of spandrel's defaults (64
features, 28 blocks, 17×17 kernels, the published realplksr models' shape), or with
`--arch plksr-dysample` the same with layer norms and DySample (the "realplksr dysample"
files' shape), or with `--arch plksr-original` PLKSR x4 of spandrel's defaults (64
features, 28 blocks, CCM mixers, 17×17 kernels), or with `--arch safmn` SAFMN x4 (36
wide, 8 blocks: the published x4 model's shape), or with `--arch mosr` MoSR x4 of
spandrel's defaults (64 wide, 24 gated blocks, 7×7 kernels), or with
`--arch swinir` A1111's "SwinIR 4x" (SwinIR-L real-world x4: 240 wide, nine groups of six
blocks of eight heads, 8-pixel windows, nearest+conv, 3conv), or with `--arch hat` HAT-S
x4 (144 wide, six groups of six blocks of six heads, 16-pixel windows), or with
`--arch atd` ATD x4 (the paper's "ATD" shape: 210 wide, six groups of six layers of six
heads, 16-pixel windows, 128 tokens reduced to 20, categories of 256), or with
`--arch atd-light` ATD-light x4 (48 wide, four groups of six layers of four heads,
16-pixel windows, 64 tokens reduced to 8, categories of 128, the direct pixel shuffle),
or with `--arch dctlsa` DCTLSA x4 (the published shape: 55 wide, six modules, five
heads), or with `--arch craft` CRAFT x4 (the published shape, spandrel's defaults: 48
wide, four groups of two blocks of six heads, 4×16 windows), or with `--arch mmrealsr`
MMRealSR x4 (the published shape, spandrel's defaults: RRDBNet's 64 wide, 23 blocks,
growth 32, two degradations estimated by four stages 64 to 512 wide), or with
`--arch aura-sr` AuraSR x4 (fal's published shape, 617 M parameters:
64 wide, levels 64 to 1024 wide, a 128-to-512 style network of four layers, four
kernels per convolution, transformers of eight 64-wide heads on the two coarsest up
levels and in the middle), or with `--arch dat`
A1111's "DAT x4" (180 wide, six groups of six blocks of six heads, 8×32 windows, FFN
expansion 4), or with `--arch drct` DRCT x4 (spandrel's defaults, the published "DRCT"
files' shape: 180 wide, six dense groups of five blocks, 6 heads, 16-pixel windows,
growth 32), or with `--arch swin2sr` Swin2SR real-world x4 (the published
"Swin2SR_RealworldSR_X4_64_BSRGAN_PSNR" shape: 180 wide, six groups of six blocks of six
heads, 8-pixel windows, nearest+conv), or with `--arch realcugan` Real-CUGAN x4 (the
published "up4x" networks' fixed shape), or with `--arch rcan` RCAN x4 of spandrel's
defaults (the published RCAN x4 shape: 64 wide, ten groups of twenty blocks, reduction
16), or with `--arch omnisr` OmniSR x4 (the published "OmniSR_X4_DIV2K" shape: 64 wide,
five groups of one block, 8-pixel windows), or with `--arch rgt` RGT x4 (the paper's
shape: 180 wide, eight groups of six blocks of six heads, 8×32 windows), or with
`--arch fdat` FDAT x4 of spandrel's defaults (the "medium" files: 120 wide, four groups
of six blocks of four heads, 8-pixel windows, transposed convolutions), or with
`--arch ditn` DITN x4 (the published "DITN_Real" shape: 60 wide, one unit of four local
and four global blocks), or with `--arch swiftsrgan` Swift-SRGAN x4 of spandrel's
defaults (the published x4 shape: 64 wide, 16 residual blocks), or with `--arch moesr`
MoESR x4 of spandrel's defaults (64 wide, nine groups of four gated blocks, the direct
pixel shuffle), or with `--arch safmnbcie` SAFMN BCIE (36 wide, six groups of six
blocks, unshuffled by 2; x1), or with `--arch seemore` SeemoRe x4 of spandrel's defaults
(64 wide, six groups, six experts), or with `--arch dncnn` DnCNN (the published
"dncnn_color_blind" shape: 64 wide, 20 layers; x1), with `--arch drunet` DRUNet (the
published "drunet_color" shape: 64 to 512 wide, four blocks a level; x1), with
`--arch fbcnn` FBCNN (the published "fbcnn_color" shape: 64 to 512 wide, four blocks a
level; x1), with `--arch nafnet` NAFNet (the published "NAFNet-SIDD-width32" shape: four
levels of 2, 2, 4 and 8 blocks, 12 in the middle; x1), or with
`--arch scunet` ScuNET (SCUNet of 64 channels, four blocks a
stage: the ScuNET GAN and PSNR denoisers, x1), with random
weights, one image enlarged by spandrel (the loader
A1111 and ComfyUI use, with RealESRGANer's tiling) and by `sdxld bench-upscale`, same
weights, same tiling, same threads, each in its own process.

Prints output megapixels per second for both, the ratio sdxld / spandrel (above 1 means
sdxld is faster) and each process's peak resident memory, tiled and whole. With
`--device cuda --dtype bfloat16` both run on the GPU in that dtype (spandrel's model and
input cast as A1111 and ComfyUI cast them), timed after a CUDA synchronisation, and the
peak is the allocator's (torch.cuda.max_memory_allocated; sdxld's from its shim).
Usage: bench/upscale.py --sdxld target/release/sdxld [--arch rrdb|span|plksr|plksr-dysample|
plksr-original|safmn|mosr|swinir|swin2sr|hat|atd|atd-light|dctlsa|craft|mmrealsr|aura-sr|dat|drct|realcugan|rcan|omnisr|rgt|fdat|ditn|
swiftsrgan|moesr|safmnbcie|seemore|dncnn|drunet|fbcnn|nafnet|scunet]
[--size 512]
[--tile 256] [--threads 2] [--tiled-only] [--device cuda --dtype bfloat16]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_model(path: Path, arch: str) -> str:
    """Writes the benchmark's model; its description."""
    from safetensors.torch import save_file
    from spandrel.architectures.ATD import ATD
    from spandrel.architectures.CRAFT import CRAFT
    from spandrel.architectures.DAT import DAT
    from spandrel.architectures.DCTLSA import DCTLSA
    from spandrel.architectures.DITN import DITN
    from spandrel.architectures.DnCNN import DnCNN
    from spandrel.architectures.DRUNet import DRUNet
    from spandrel.architectures.DRCT import DRCT
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.FBCNN import FBCNN
    from spandrel.architectures.FDAT import FDAT
    from spandrel.architectures.HAT import HAT
    from spandrel.architectures.MMRealSR import MMRealSR
    from spandrel.architectures.MoESR import MoESR
    from spandrel.architectures.MoSR import MoSR
    from spandrel.architectures.NAFNet import NAFNet
    from spandrel.architectures.OmniSR import OmniSR
    from spandrel.architectures.PLKSR import PLKSR, RealPLKSR
    from spandrel.architectures.RCAN import RCAN
    from spandrel.architectures.RealCUGAN import UpCunet4x
    from spandrel.architectures.RGT import RGT
    from spandrel.architectures.SAFMN import SAFMN
    from spandrel.architectures.SAFMNBCIE import SAFMNBCIE
    from spandrel.architectures.SCUNet import SCUNet
    from spandrel.architectures.SeemoRe import SeemoRe
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwiftSRGAN import SwiftSRGAN
    from spandrel.architectures.Swin2SR import Swin2SR
    from spandrel.architectures.SwinIR import SwinIR

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    from make_upscaler_fixtures import aura_sr, basicsr_names, randomise

    # arch: (builder, description)
    models = {
        "plksr": (lambda: RealPLKSR(), "x4 RealPLKSR (64dim 28nb 17ks)"),
        "plksr-dysample": (lambda: RealPLKSR(layer_norm=True, dysample=True), "x4 RealPLKSR (64dim 28nb 17ks LayerNorm DySample)"),
        "plksr-original": (lambda: PLKSR(), "x4 PLKSR (64dim 28nb 17ks CCM)"),
        "safmn": (lambda: SAFMN(dim=36, n_blocks=8, ffn_scale=2.0, upscaling_factor=4), "x4 SAFMN (36dim 8nb)"),
        "mosr": (lambda: MoSR(), "x4 MoSR (64dim 24 blocks 7ks)"),
        "hat": (lambda: HAT(embed_dim=144, depths=[6] * 6, num_heads=[6] * 6, window_size=16, compress_ratio=24, squeeze_factor=24, overlap_ratio=0.5, mlp_ratio=2.0, upscale=4, num_feat=64), "x4 HAT-S (144dim, 6x6 blocks, s64w16)"),
        "atd": (lambda: ATD(embed_dim=210, depths=[6] * 6, num_heads=[6] * 6, window_size=16, category_size=256, num_tokens=128, reducted_dim=20, convffn_kernel_size=5, mlp_ratio=2.0, upscale=4, upsampler="pixelshuffle"), "x4 ATD (210dim, 6x6 layers, 16w, 256cat)"),
        "atd-light": (lambda: ATD(embed_dim=48, depths=[6] * 4, num_heads=[4] * 4, window_size=16, category_size=128, num_tokens=64, reducted_dim=8, convffn_kernel_size=5, mlp_ratio=1.0, upscale=4, upsampler="pixelshuffledirect"), "x4 ATD-light (48dim, 4x6 layers, 16w, 128cat)"),
        "dctlsa": (lambda: DCTLSA(nf=55, upscale=4), "x4 DCTLSA (55nf, 6nm, 5nh)"),
        "craft": (lambda: CRAFT(), "x4 CRAFT (4x16, 48dim, 1conv)"),
        "mmrealsr": (lambda: MMRealSR(num_in_ch=3, num_out_ch=3), "x4 MMRealSR (64nf, 23nb)"),
        "aura-sr": (lambda: aura_sr(dim=64, style_network={"dim_in": 128, "dim_out": 512, "depth": 4}, up_dim_mults=(1, 2, 4, 8, 16), down_dim_mults=(4, 8, 16), full_attn=(False, False, False, True, True), self_attn_dim_head=64, self_attn_heads=8, attn_depths=(2, 2, 2, 2, 4), mid_attn_depth=4, num_conv_kernels=4), "x4 AuraSR (64dim, 4 kernels, fal's shape)"),
        "scunet": (lambda: SCUNet(config=[4] * 7, dim=64), "x1 SCUNet (64dim, 4 blocks a stage)"),
        "dat": (lambda: DAT(img_size=64, embed_dim=180, split_size=[8, 32], depth=[6] * 6, num_heads=[6] * 6, expansion_factor=4.0, upscale=4), "x4 DAT (180dim, 6x6 blocks, s64|8x32, 4.0ef)"),
        "drct": (lambda: DRCT(img_size=64, embed_dim=180, depths=(6,) * 6, num_heads=[6] * 6, window_size=16, mlp_ratio=2.0, upscale=4, upsampler="pixelshuffle", gc=32), "x4 DRCT (180dim, 6 dense groups, s64w16, gc 32)"),
        "realcugan": (lambda: UpCunet4x(in_channels=3, out_channels=3), "x4 Real-CUGAN"),
        "rcan": (lambda: RCAN(), "x4 RCAN (64nf 10nrg 20nrb)"),
        "omnisr": (lambda: OmniSR(num_feat=64, block_num=1, window_size=8, res_num=5, up_scale=4), "x4 OmniSR (64nf w8 5nr)"),
        "rgt": (lambda: RGT(img_size=64, embed_dim=180, depth=[6] * 8, num_heads=[6] * 8, mlp_ratio=2.0, upscale=4, split_size=[8, 32], c_ratio=0.5), "x4 RGT (180dim, 8x6 blocks, 8x32 windows)"),
        "ditn": (lambda: DITN(), "x4 DITN (60dim, 4 local and 4 global blocks)"),
        "fdat": (lambda: FDAT(), "x4 FDAT (120dim medium, 4x6 blocks, w8, transpose+conv)"),
        "swiftsrgan": (lambda: SwiftSRGAN(), "x4 Swift-SRGAN (64nf 16nb)"),
        "moesr": (lambda: MoESR(), "x4 MoESR (64dim 9nbs 4nb pixelshuffledirect)"),
        "safmnbcie": (lambda: SAFMNBCIE(dim=36), "x1 SAFMN BCIE (36dim 6nl 6nb 2uf)"),
        "seemore": (lambda: SeemoRe(), "x4 SeemoRe (64dim 6ne 6nl)"),
        "dncnn": (lambda: DnCNN(in_nc=3, out_nc=3, nc=64, nb=20, act_mode="R"), "x1 DnCNN (64nc 20nb)"),
        "drunet": (lambda: DRUNet(in_nc=4, out_nc=3), "x1 DRUNet (64-512 wide, 4nb)"),
        "fbcnn": (lambda: FBCNN(), "x1 FBCNN (64-512 wide, 4nb)"),
        "nafnet": (lambda: NAFNet(width=32, middle_blk_num=12, enc_blk_nums=[2, 2, 4, 8], dec_blk_nums=[2, 2, 2, 2]), "x1 NAFNet (32w, SIDD)"),
        "swin2sr": (lambda: Swin2SR(img_size=64, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=8, mlp_ratio=2.0, upscale=4, upsampler="nearest+conv", resi_connection="1conv"), "x4 Swin2SR real-world (180dim, 6x6 blocks, s64w8, nearest+conv)"),
        "swinir": (lambda: SwinIR(img_size=64, embed_dim=240, depths=[6] * 9, num_heads=[8] * 9, window_size=8, mlp_ratio=2.0, upscale=4, upsampler="nearest+conv", resi_connection="3conv"), "x4 SwinIR-L (240dim, 9x6 blocks, s64w8, nearest+conv, 3conv)"),
        "span": (lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=48, upscale=4), "x4 SPAN (48nf)"),
        "rrdb": (lambda: ESRGAN(num_filters=64, num_blocks=23, scale=4), "x4 RRDBNet (64nf 23nb)"),
    }
    builder, described = models[arch]
    model = builder()
    randomise(model, 0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if arch == "rrdb":
        state = basicsr_names(state)
    save_file({f"params_ema.{k}": v for k, v in state.items()}, str(path))
    return described


def spandrel_child(args):
    """Runs in its own process: times spandrel and prints JSON."""
    import spandrel
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    from make_upscaler_fixtures import called, tile_process

    torch.set_num_threads(args.threads)
    state = load_file(args.model)
    state = {"params_ema": {k.removeprefix("params_ema."): v for k, v in state.items()}}
    dtype = getattr(torch, args.dtype)
    descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    descriptor.model.eval().to(args.device, dtype)
    # As A1111 and ComfyUI call it: padded to the size requirements, cropped back.
    model = called(descriptor)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, args.size, args.size), dtype=np.float32))
    image = image.to(args.device, dtype)
    cuda = args.device.startswith("cuda")
    times = []
    with torch.no_grad():
        for _ in range(args.runs + (1 if cuda else 0)):
            start = time.perf_counter()
            if args.tile > 0:
                out = tile_process(model, image, descriptor.scale, args.tile, 10)
            else:
                out = model(image)
            out = (out.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    times = times[1:] if cuda else times
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0
    print(json.dumps({"seconds": times, "device_peak_mib": peak}))


def run(cmd):
    """A child's output (JSON on its last line) and its own peak resident memory in MiB."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with {child.returncode}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--arch", choices=["rrdb", "span", "plksr", "plksr-dysample", "plksr-original", "safmn", "mosr", "swinir", "swin2sr", "hat", "atd", "atd-light", "dctlsa", "craft", "mmrealsr", "aura-sr", "dat", "drct", "realcugan", "rcan", "omnisr", "rgt", "fdat", "ditn", "swiftsrgan", "moesr", "safmnbcie", "seemore", "dncnn", "drunet", "fbcnn", "nafnet", "scunet"], default="rrdb")
    parser.add_argument("--size", type=int, default=512, help="input side (1024 for 4096 out)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tiled-only", action="store_true", help="skip the whole-image run (memory grows with the image)")
    parser.add_argument("--spandrel-child", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.spandrel_child:
        return spandrel_child(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "x4.safetensors"
        described = write_model(model, args.arch)
        scale = 1 if args.arch in ("scunet", "safmnbcie", "dncnn", "drunet", "fbcnn", "nafnet") else 4
        megapixels = (args.size * scale) ** 2 / 1e6
        rows = []
        for tile in (args.tile,) if args.tiled_only else (args.tile, 0):
            common = ["--size", str(args.size), "--tile", str(tile), "--threads", str(args.threads), "--runs", str(args.runs), "--device", args.device, "--dtype", args.dtype]
            spandrel, spandrel_peak = run([sys.executable, __file__, "--spandrel-child", "--model", str(model), "--sdxld", args.sdxld] + common)
            sdxld, sdxld_peak = run([args.sdxld, "bench-upscale", "--model", str(model)] + common)
            s, d = statistics.median(spandrel["seconds"]), statistics.median(sdxld["seconds"])
            label = f"tile {tile}" if tile else "whole image"
            where = f"{args.threads} threads" if args.device == "cpu" else f"{args.device} {args.dtype}"
            device = ""
            if args.device != "cpu":
                device = f", device peak spandrel {spandrel.get('device_peak_mib', 0):.0f} / sdxld {sdxld.get('device_peak_mib', 0):.0f} MiB"
            rows.append(
                f"{args.size}² -> {args.size * scale}² {described}, {label}, {where}: "
                f"spandrel {megapixels / s:.3f} MP/s ({s:.2f} s, peak RSS {spandrel_peak:.0f} MiB), "
                f"sdxld {megapixels / d:.3f} MP/s ({d:.2f} s, peak RSS {sdxld_peak:.0f} MiB), ratio {s / d:.2f}{device}"
            )
        print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
