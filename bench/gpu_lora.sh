#!/usr/bin/env bash
# The LoRA checks on a CUDA machine that has PyTorch but no Rust (see bench/gpu_check.sh
# for the .gpu/ layout; .gpu/tiny2_lora holds the tiny2 fixture's lora/ folder and
# lora.safetensors):
#   1. float32 on CUDA: a stacked kohya + PEFT request on tiny2 in both LoRA modes against
#      diffusers' latents (computed on the CPU by the fixture script);
#   2. the random full-size SDXL base (bench/gpu_full.py --write-only) with three LoRA files
#      of common shapes: `sdxld bench-lora` (step time with 0, 1 and 3 adapters, switching
#      cost, both modes), and the bfloat16 latents of merge against forward.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L
sdxld=.gpu/sdxld
compare() {
  python3 - "$@" <<'PY'
import sys
from safetensors.torch import load_file
a = load_file(sys.argv[1])[sys.argv[2]].float()
b = next(iter(load_file(sys.argv[3]).values())).float().reshape(a.shape)
print(f"{sys.argv[4]}: max|a-b|/max|a| = {((a - b).abs().max() / a.abs().max()).item():.3e}, finite={bool(b.isfinite().all())}")
PY
}

for mode in merge forward; do
  "$sdxld" generate --model .gpu/tiny2 --device cuda --dtype float32 --lora-dir .gpu/tiny2_lora/lora \
    --lora char_kohya:0.8 --lora style_peft:-0.5 --lora-mode "$mode" \
    --prompt "a knight in shining armour" --negative-prompt blurry --steps 4 --guidance 5 \
    --width 64 --height 64 --seed 61 --output /tmp/tiny-lora.png --latents-out /tmp/tiny-lora.safetensors >/dev/null
  compare .gpu/tiny2_lora/lora.safetensors stacked.latents /tmp/tiny-lora.safetensors "tiny2 CUDA float32 stacked LoRAs ($mode) vs diffusers (CPU)"
done

python3 bench/gpu_full.py --sdxld "$sdxld" --vocab .gpu/clip_vocab --write-only
python3 bench/gpu_lora.py --sdxld "$sdxld" --steps 20 --runs 5
for mode in merge forward; do
  start=$(date +%s.%N)
  "$sdxld" generate --model /tmp/sdxl-random --device cuda --dtype bfloat16 --lora-dir /tmp/sdxl-loras \
    --lora style:0.8 --lora character:0.7 --lora detail:0.5 --lora-mode "$mode" \
    --prompt "a lighthouse at dusk" --steps 10 --guidance 5 --width 1024 --height 1024 --seed 3 \
    --output "/tmp/full-$mode.png" --latents-out "/tmp/full-$mode.safetensors" >/dev/null || echo "FAILED $mode"
  echo "full-size $mode: process wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
done
compare /tmp/full-forward.safetensors latents /tmp/full-merge.safetensors "full-size bf16, 3 LoRAs: merge vs forward"
