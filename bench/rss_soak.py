#!/usr/bin/env python3
"""Resident memory of `sdxld serve` over a long mixed run on the CPU.

Starts the server (the built-in demo model unless --model is given), then for --minutes
runs a fixed rotation of jobs: a 2048x2048 image, a streamed batch with previews, image
to image at 1024x1024, a stream dropped after its first event, a refused request and a
portrait with another scheduler. It samples the server's RSS (VmRSS) every few seconds
and prints it at the start, after the first 2048x2048 job, and per minute (lowest,
highest, last), then the growth over the run.

  python3 bench/rss_soak.py --sdxld PATH [--minutes 10] [--model NAME_OR_DIR]
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]


def stubs():
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="sdxld-stubs-"))
    include = Path(protoc.__file__).parent / "_proto"
    protos = [str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto")]
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    assert protoc.main(args) == 0, args
    sys.path.insert(0, str(out))
    from sdxld.v1 import generation_pb2, generation_pb2_grpc

    return generation_pb2, generation_pb2_grpc


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start(binary: str, model: str | None, **settings: str):
    """`sdxld serve` on a free loopback port on the CPU (`settings`: more SDXLD__ variables)."""
    cmd = [binary, "serve", "--listen", "127.0.0.1:0"] + (["--model", model] if model else [])
    env = dict(os.environ, SDXLD__ENGINE__DEVICE="cpu", SDXLD__SERVER__METRICS_LISTEN="", **settings)
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in process.stdout:
        if line.startswith("sdxld listening on "):
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, line.split()[-1]
    raise SystemExit("the server did not start")


def init_png() -> bytes:
    from PIL import Image

    data = io.BytesIO()
    Image.new("RGB", (1024, 1024), (120, 60, 30)).save(data, format="PNG")
    return data.getvalue()


def rotation(pb, png):
    spec = lambda **kw: pb.GenerationSpec(prompt="a lighthouse at dusk", seed=1, **kw)
    return [
        ("2048x2048", "unary", spec(width=2048, height=2048, steps=1)),
        ("batch+previews", "stream", spec(width=512, height=512, steps=4, num_images=2,
                                           output=pb.OutputOptions(preview_every_n_steps=1))),
        ("img2img 1024", "unary", spec(width=1024, height=1024, steps=4,
                                       init_image=pb.InitImage(image=png, strength=0.5))),
        ("dropped stream", "drop", spec(width=1024, height=1024, steps=20)),
        ("refused", "unary", spec(width=1000, height=64, steps=1)),
        ("portrait dpm", "unary", spec(width=768, height=1024, steps=3,
                                       scheduler=pb.SCHEDULER_DPM_SOLVER_MULTISTEP)),
    ]


def run(stub, pb, kind, spec):
    if kind == "unary":
        try:
            stub.GenerateImages(pb.GenerateImagesRequest(spec=spec), timeout=600)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
    elif kind == "stream":
        for _ in stub.Generate(pb.GenerateRequest(spec=spec), timeout=600):
            pass
    else:
        call = stub.Generate(pb.GenerateRequest(spec=spec), timeout=600)
        next(call)
        call.cancel()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--model")
    args = parser.parse_args()
    pb, grpc_pb = stubs()
    process, address = start(args.sdxld, args.model)
    samples = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.time(), rss_bytes(process.pid)))
            done.wait(2)

    try:
        options = [("grpc.max_receive_message_length", 256 << 20)]
        stub = grpc_pb.GenerationServiceStub(grpc.insecure_channel(address, options=options))
        time.sleep(2)
        started = time.time()
        at_start = rss_bytes(process.pid)
        threading.Thread(target=sample, daemon=True).start()
        jobs = rotation(pb, init_png())
        after_big, count = None, 0
        while time.time() - started < args.minutes * 60:
            name, kind, spec = jobs[count % len(jobs)]
            run(stub, pb, kind, spec)
            count += 1
            if after_big is None and name == "2048x2048":
                time.sleep(1)
                after_big = rss_bytes(process.pid)
        time.sleep(2)
        final = rss_bytes(process.pid)
    finally:
        done.set()
        process.terminate()
        process.wait()
    mib = lambda b: f"{b / 2**20:7.1f} MiB"
    print(f"{args.sdxld}: {count} jobs in {args.minutes:g} min")
    print(f"  start {mib(at_start)}; after the first 2048x2048 job {mib(after_big)} (+{mib(after_big - at_start)})")
    for minute in range(int(args.minutes) + 1):
        window = [r for t, r in samples if minute * 60 <= t - started < (minute + 1) * 60]
        if window:
            print(f"  minute {minute:2d}: lowest {mib(min(window))}, highest {mib(max(window))}, last {mib(window[-1])}")
    print(f"  final {mib(final)}; growth over the run {mib(final - at_start)}; highest {mib(max(r for _, r in samples))}")


if __name__ == "__main__":
    sys.exit(main())
