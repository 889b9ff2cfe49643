#!/usr/bin/env bash
# The GPU checks, run by hand on a CUDA machine that has PyTorch but no Rust:
#   .gpu/sdxld         the release binary built here
#   .gpu/tiny2         a tiny fixture pipeline (from tests/fixtures/make_fixtures.py)
#   .gpu/whl           wheels missing there (diffusers, importlib_metadata)
# Prints: float32 CUDA parity against diffusers on CUDA, the CPU speed ratio, and
# float16/bfloat16 generations on the demo model (finite, non-constant, timed).
set -uo pipefail
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L
sdxld=.gpu/sdxld
ldd "$sdxld" | grep -E "libtorch_cuda|not found"

for config in tiny2; do
  python3 bench/e2e.py --model ".gpu/$config" --sdxld "$sdxld" --runs 5 --cuda
done

"$sdxld" demo-model --output /tmp/demo >/dev/null
for dtype in float32 float16 bfloat16; do
  start=$(date +%s.%N)
  "$sdxld" generate --model /tmp/demo --device cuda --dtype "$dtype" --steps 30 \
    --width 1024 --height 1024 --seed 1 --prompt "a lighthouse" \
    --output "$out/demo-$dtype.png" --latents-out "/tmp/latents-$dtype.safetensors" || echo "FAILED $dtype"
  end=$(date +%s.%N)
  python3 - "$dtype" "$start" "$end" <<'PY'
import sys
import numpy as np
from PIL import Image
from safetensors.torch import load_file
dtype, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lat = load_file(f"/tmp/latents-{dtype}.safetensors")["latents"]
ref = load_file("/tmp/latents-float32.safetensors")["latents"]
import os
img = np.asarray(Image.open(os.path.join(os.environ.get("OUT", "/tmp/gpu-check"), f"demo-{dtype}.png"))).astype(float)
print(f"{dtype}: process wall {end - start:.2f} s, latents finite={bool(lat.isfinite().all())}, "
      f"latent std={lat.std().item():.3f}, image std={img.std():.1f}, max|{dtype}-float32|/max = {((lat - ref).abs().max() / ref.abs().max()).item():.3e}")
PY
done

# The upscaler on CUDA in bfloat16: 1024² -> 4096² RRDBNet x4 against spandrel (its wheel
# under .gpu/whl), same weights and tiling.
if python3 -c "import spandrel" 2>/dev/null; then
  python3 bench/upscale.py --sdxld "$sdxld" --size 1024 --tile 512 --runs 3 --tiled-only \
    --device cuda --dtype bfloat16
else
  echo "spandrel is not importable: put its wheel (and einops's) under .gpu/whl for the upscale figure"
fi
