#!/usr/bin/env python3
"""Control-LoRAs on the CPU: how long building the ControlNet takes, against diffusers'
loader in the same run, and what one unit costs per denoising step.

Writes load_rss.py's mid-size random SDXL-architecture pipeline (float32) and a random
Control-LoRA of rank --rank for its UNet (float16, as published), then:
  - diffusers: ControlNetModel.from_unet(unet) and load_lora_adapter(file) on the UNet
    already loaded (as a worker that has its base model in memory builds one), median of
    --runs;
  - sdxld: `sdxld serve` on the pipeline; a request with a Control-LoRA unit after a
    plain one: the job's loading stage builds the ControlNet (the first time also hashing
    the file), UnloadModel between runs, median of --runs;
  - the time per denoising step with the unit against a plain request's, at --size with
    --steps (the target for one ControlNet unit: at most 1.6x).

  python3 bench/control_lora.py --sdxld PATH --vocab DIR [--rank 128] [--runs 3]
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures"))
import control_lora_fixtures  # noqa: E402
from load_rss import write_model  # noqa: E402
from rss_soak import start, stubs  # noqa: E402


def write_control_lora(model: Path, out: Path, rank: int):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    template = ControlNetModel.from_unet(unet).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        embedding = template.controlnet_cond_embedding
        for module in [embedding.conv_out, *template.controlnet_down_blocks, template.controlnet_mid_block]:
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.weight[0].numel() ** 0.5)
    control_lora_fixtures.write(out, template, 4, unet_biases=False, dtype=torch.float16, rank=rank)


def diffusers_build_seconds(model: Path, file: Path, runs: int) -> float:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    times = []
    for _ in range(runs):
        start_time = time.perf_counter()
        controlnet = ControlNetModel.from_unet(unet)
        controlnet.load_lora_adapter(str(file), prefix=None, controlnet_config=controlnet.config)
        times.append(time.perf_counter() - start_time)
        del controlnet
    return statistics.median(times)


def stage_ms(response, pb, stage) -> float:
    return sum(t.duration_ms for t in response.completed.stage_timings if t.stage == stage)


def sdxld_figures(args, pb, grpc_stubs, control_image: bytes):
    from sdxld.v1 import models_pb2, models_pb2_grpc

    roots = Path(tempfile.mkdtemp(prefix="sdxld-control-lora-roots-"))
    # A link out of the roots would not be followed: a copy.
    shutil.copy(args.file, roots / "bench_lora.safetensors")
    process, address = start(args.sdxld, str(args.model), SDXLD__MODELS__CONTROLNET_ROOTS=str(roots),
                             SDXLD__SERVER__ALLOW_UNAUTHENTICATED_ADMIN="true")
    try:
        channel = grpc.insecure_channel(address)
        generate = grpc_stubs.GenerationServiceStub(channel).GenerateImages
        models = models_pb2_grpc.ModelServiceStub(channel)
        spec = lambda units, steps: pb.GenerationSpec(prompt="a lighthouse", seed=1, steps=steps, width=args.size, height=args.size,
                                                      controlnets=units)
        unit = [pb.ControlNetUnit(model="bench_lora", image=control_image)]
        generate(pb.GenerateImagesRequest(spec=spec([], 1)))
        builds = []
        for run in range(args.runs + 1):
            response = generate(pb.GenerateImagesRequest(spec=spec(unit, 1)))
            builds.append(stage_ms(response, pb, pb.STAGE_LOADING_MODELS) / 1000)
            if run < args.runs:
                models.UnloadModel(models_pb2.UnloadModelRequest(name="bench_lora", kind=pb.MODEL_KIND_CONTROLNET))
        plain = generate(pb.GenerateImagesRequest(spec=spec([], args.steps)))
        controlled = generate(pb.GenerateImagesRequest(spec=spec(unit, args.steps)))
        step = lambda r: stage_ms(r, pb, pb.STAGE_DENOISING) / args.steps
        return builds[0], statistics.median(builds[1:]), step(plain), step(controlled)
    finally:
        process.terminate()
        process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--vocab", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "sdxld-load-rss-model")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not (args.model / "model_index.json").exists():
        write_model(args.model, args.vocab)
    args.file = Path(tempfile.gettempdir()) / f"sdxld-control-lora-rank{args.rank}.safetensors"
    if not args.file.exists():
        write_control_lora(args.model, args.file, args.rank)
    pb, grpc_stubs = stubs()
    import io

    from PIL import Image

    data = io.BytesIO()
    Image.new("RGB", (args.size, args.size), (200, 200, 200)).save(data, format="PNG")
    baseline = diffusers_build_seconds(args.model, args.file, args.runs)
    first, build, plain, controlled = sdxld_figures(args, pb, grpc_stubs, data.getvalue())
    print(f"Control-LoRA rank {args.rank} ({args.file.stat().st_size / 2**20:.0f} MiB) on the mid-size UNet:")
    print(f"  building the ControlNet: sdxld {build:.2f} s (first use, hashing the file too: {first:.2f} s), "
          f"diffusers from_unet + load_lora_adapter {baseline:.2f} s: {baseline / build:.2f}x")
    print(f"  a denoising step at {args.size}x{args.size}: {controlled:.0f} ms with the unit, {plain:.0f} ms without: "
          f"{controlled / plain:.2f}x (target <= 1.6x)")


if __name__ == "__main__":
    sys.exit(main())
