#!/usr/bin/env python3
"""How soon a preprocessing or upscaling job stops once its deadline passes.

Starts `sdxld serve` with controlnet_aux's OpenPose body, face and hand networks at their
published sizes (random weights, written once into a temporary preprocessor root), or
with `--detector KIND` one of `bench/preprocess.py`'s full-size networks (`zoe`, `depth`,
`dpt`, `leres`, `normal`, `hed`, `pidinet`, `teed`, `segmentation`, `lineart`,
`lineart_anime`, `mlsd`), or with `--upscaler ARCH` one of
`bench/upscale.py`'s full-size upscalers (random weights, in a temporary upscaler root),
then on a square noise image:

  1. times the whole PREPROCESSOR_OPENPOSE_FULL map (or the detector's depth, normal,
     soft-edge or segmentation map) through the Preprocess RPC, or the image's upscale through the Upscale RPC
     (one tile: the server's 512-pixel tile covers it), as the baseline: what a stop
     honoured only at the job's end can cost;
  2. times a small request of the same kind alone;
  3. sends the whole job again with a deadline of --deadline seconds and, the moment it
     is refused, the small request: the time from the deadline to that request's answer,
     less its own time alone, is how long the worker kept running the stopped job.

Prints the three figures and the stop latency against the baseline's remaining time.

  python3 bench/stop_latency.py --sdxld PATH [--size 1024] [--deadline 12]
  python3 bench/stop_latency.py --sdxld PATH --detector zoe --size 512 --deadline 3
  python3 bench/stop_latency.py --sdxld PATH --upscaler rrdb --size 192 --deadline 2
"""

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

import preprocess as detectors  # noqa: E402
import upscale as upscalers  # noqa: E402
from rss_soak import start, stubs  # noqa: E402


def write_networks(root: Path):
    """The body network under the default name, the face and hand networks beside it."""
    body = root / "body_pose_model.safetensors"
    detectors.write_model("openpose_full", body)
    os.rename(detectors.face_file(body), root / "facenet.safetensors")
    os.rename(detectors.hand_file(body), root / "hand_pose_model.safetensors")


def png(pixels: np.ndarray) -> bytes:
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    return data.getvalue()


def timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def openpose_job(pb, stub, noise, root: Path):
    """The preprocessing job: its networks written into `root`, its server settings, the
    whole map's call, a small map's call and a description."""
    write_networks(root)
    full = pb.PreprocessRequest(
        image=png(noise),
        preprocessor=pb.PREPROCESSOR_OPENPOSE_FULL,
        preprocessor_params=pb.PreprocessorParams(detect_resolution=0),
    )
    small = pb.PreprocessRequest(image=png(noise[:64, :64]), preprocessor=pb.PREPROCESSOR_OPENPOSE)
    settings = dict(SDXLD__MODELS__PREPROCESSOR_ROOTS=str(root))
    call = lambda request, timeout: stub().Preprocess(request, timeout=timeout)
    return settings, lambda t: call(full, t), lambda t: call(small, t), "openpose_full map"


DETECTOR_FOLDERS = ("zoe", "depth", "dpt", "segmentation")


def detector_job(pb, stub, noise, root: Path, kind: str):
    """A detector's map job, as `openpose_job` describes it."""
    name = "bench" if kind in DETECTOR_FOLDERS else "bench.safetensors"
    detectors.write_model(kind, root / name)
    preprocessor = {
        "normal": pb.PREPROCESSOR_NORMAL,
        "hed": pb.PREPROCESSOR_SOFTEDGE,
        "pidinet": pb.PREPROCESSOR_SOFTEDGE,
        "teed": pb.PREPROCESSOR_SOFTEDGE,
        "segmentation": pb.PREPROCESSOR_SEGMENTATION,
        "lineart": pb.PREPROCESSOR_LINEART,
        "lineart_anime": pb.PREPROCESSOR_LINEART_ANIME,
        "mlsd": pb.PREPROCESSOR_MLSD,
    }.get(kind, pb.PREPROCESSOR_DEPTH)
    params = pb.PreprocessorParams(detect_resolution=0, model="bench")
    whole = pb.PreprocessRequest(image=png(noise), preprocessor=preprocessor, preprocessor_params=params)
    small = pb.PreprocessRequest(image=png(noise[:64, :64]), preprocessor=preprocessor, preprocessor_params=params)
    settings = dict(SDXLD__MODELS__PREPROCESSOR_ROOTS=str(root))
    call = lambda request, timeout: stub().Preprocess(request, timeout=timeout)
    return settings, lambda t: call(whole, t), lambda t: call(small, t), f"{kind} map"


def upscale_job(pb, stub, noise, root: Path, arch: str):
    """The upscaling job, as `openpose_job` describes it."""
    described = upscalers.write_model(root / "bench.safetensors", arch)
    step = pb.UpscaleStep(model="bench")
    whole = pb.UpscaleRequest(image=png(noise), upscale=step)
    small = pb.UpscaleRequest(image=png(noise[:16, :16]), upscale=step)
    settings = dict(SDXLD__MODELS__UPSCALER_ROOTS=str(root))
    call = lambda request, timeout: list(stub().Upscale(request, timeout=timeout))
    return settings, lambda t: call(whole, t), lambda t: call(small, t), f"{described} upscale"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--deadline", type=float, default=12.0)
    parser.add_argument("--upscaler", help="an architecture of bench/upscale.py")
    parser.add_argument("--detector", choices=["zoe", "depth", "dpt", "leres", "normal", "hed", "pidinet", "teed", "segmentation", "lineart", "lineart_anime", "mlsd"])
    args = parser.parse_args()
    pb, rpc = stubs()
    noise = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="sdxld-stop-") as root:
        address = []
        stub = lambda: rpc.GenerationServiceStub(grpc.insecure_channel(address[0]))
        if args.upscaler:
            job = upscale_job(pb, stub, noise, Path(root), args.upscaler)
        elif args.detector:
            job = detector_job(pb, stub, noise, Path(root), args.detector)
        else:
            job = openpose_job(pb, stub, noise, Path(root))
        settings, whole_call, small_call, what = job
        server, listening = start(args.sdxld, None, **settings)
        address.append(listening)
        try:
            small_call(600)
            whole = timed(lambda: whole_call(3600))
            alone = timed(lambda: small_call(600))
            sent = time.perf_counter()
            try:
                whole_call(args.deadline)
                raise SystemExit(f"the job finished inside {args.deadline} s: give a shorter --deadline")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            small_call(600)
            after = time.perf_counter() - sent - args.deadline
        finally:
            server.terminate()
            server.wait()
    latency = after - alone
    print(f"{what} of a {args.size}² image, uninterrupted: {whole:.2f} s")
    print(f"a small job of the same kind alone: {alone:.2f} s")
    print(f"next request answered {after:.2f} s after the {args.deadline:g} s deadline")
    remaining = max(whole - args.deadline, 0.0)
    print(f"stop latency: {latency:.2f} s (the job had {remaining:.2f} s left to run)")


if __name__ == "__main__":
    main()
