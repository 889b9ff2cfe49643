#!/usr/bin/env python3
"""How soon a preprocessing job stops once its deadline passes.

Starts `sdxld serve` with controlnet_aux's OpenPose body, face and hand networks at their
published sizes (random weights, written once into a temporary preprocessor root), then
on a square noise image:

  1. times the whole PREPROCESSOR_OPENPOSE_FULL map through the Preprocess RPC (the
     baseline: what a stop honoured only at the map's end can cost);
  2. times a small OpenPose request alone;
  3. sends the full map again with a deadline of --deadline seconds and, the moment it is
     refused, the small request: the time from the deadline to that request's answer,
     less its own time alone, is how long the worker kept running the stopped job.

Prints the three figures and the stop latency against the baseline's remaining time.

  python3 bench/stop_latency.py --sdxld PATH [--size 1024] [--deadline 12]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--deadline", type=float, default=12.0)
    args = parser.parse_args()
    pb, rpc = stubs()
    noise = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    full = pb.PreprocessRequest(
        image=png(noise),
        preprocessor=pb.PREPROCESSOR_OPENPOSE_FULL,
        preprocessor_params=pb.PreprocessorParams(detect_resolution=0),
    )
    small = pb.PreprocessRequest(image=png(noise[:64, :64]), preprocessor=pb.PREPROCESSOR_OPENPOSE)
    with tempfile.TemporaryDirectory(prefix="sdxld-stop-") as root:
        write_networks(Path(root))
        server, address = start(args.sdxld, None, SDXLD__MODELS__PREPROCESSOR_ROOTS=root)
        try:
            stub = rpc.GenerationServiceStub(grpc.insecure_channel(address))
            whole = timed(lambda: stub.Preprocess(full, timeout=3600))
            alone = timed(lambda: stub.Preprocess(small, timeout=600))
            sent = time.perf_counter()
            try:
                stub.Preprocess(full, timeout=args.deadline)
                raise SystemExit(f"the map finished inside {args.deadline} s: give a shorter --deadline")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            stub.Preprocess(small, timeout=600)
            after = time.perf_counter() - sent - args.deadline
        finally:
            server.terminate()
            server.wait()
    latency = after - alone
    print(f"openpose_full map of a {args.size}² image, uninterrupted: {whole:.2f} s")
    print(f"a 64² openpose map alone: {alone:.2f} s")
    print(f"next request answered {after:.2f} s after the {args.deadline:g} s deadline")
    remaining = max(whole - args.deadline, 0.0)
    print(f"stop latency: {latency:.2f} s (the map had {remaining:.2f} s left to run)")


if __name__ == "__main__":
    main()
