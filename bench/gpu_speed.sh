#!/usr/bin/env bash
# The GPU speed checks in one call, on a CUDA machine that has PyTorch but no Rust (the
# .gpu/ layout of bench/gpu_check.sh: .gpu/sdxld, .gpu/tiny2, .gpu/clip_vocab, .gpu/whl):
#   1. float32 on CUDA, tiny2: sdxld's latents against diffusers' in the plain layout,
#      with channels-last convolutions and fused projections, and with CUDA graphs (the
#      third and fourth UNet calls replayed); then in bfloat16, the plain run and cuDNN's
#      and the memory-efficient attention kernels and the VAE decoded in bands against
#      diffusers' bfloat16 latents;
#   2. the random full-size SDXL base in bfloat16: sdxld and diffusers (eager, SDPA) at
#      1024² batch 1 (30 steps): times, allocator peaks and per-stage profiles side by
#      side (folded stacks for flame graphs); then the variants at 1024² batch 1 against
#      plain (CUDA graphs, each layout option, cuDNN autotuning, all of them, cuDNN's
#      attention kernel first, the VAE decoded in bands of 128 rows, a memory budget that holds the weights but not the
#      activations beside them so that the text encoders go to the host once the
#      prompts are encoded, A1111's syntax with a negative of the prompt's length and
#      with one a chunk longer, whose calls attend through a key mask; a variant's
#      profile run is eager: graphs step aside while a profile records); then 1024²
#      batch 4 (20 steps, images per second) and 768².
# SIZES, BATCHES, RUNS, STEPS and VARIANTS narrow or widen it to fit the device time at
# hand. A dry run of the whole script on the CPU, before GPU time is spent (the tiny2
# pipeline in float32 stands in for the full-size model; CUDA-only options are no-ops):
#   DEVICE=cpu MODEL=.gpu/tiny2 DTYPE=float32 SIZES=256 BATCHES=1,2 RUNS=1 STEPS=2 bench/gpu_speed.sh
# What comes back from $OUT (at most 8 files): speed.log, everything printed, and
# folded.tar.gz, the folded stacks, packed on exit. The full-size part stops itself at
# DEADLINE_S seconds from the start (570 by default), so that both come back within a
# 600-second call.
set -uo pipefail
started=$SECONDS
out="${OUT:-/tmp/gpu-speed}"
device="${DEVICE:-cuda}"
mkdir -p "$out"
exec > >(tee -a "$out/speed.log") 2>&1
folded="$(mktemp -d)"
trap 'tar -czf "$out/folded.tar.gz" -C "$folded" .' EXIT
source "$(dirname "$0")/gpu_env.sh"
[ "$device" = cuda ] && nvidia-smi -L
sdxld=.gpu/sdxld
ldd "$sdxld" | grep -E "libtorch_cuda|not found"

python3 bench/e2e.py --model .gpu/tiny2 --sdxld "$sdxld" --steps 4 --cuda-only --check-device "$device" \
  --cuda-flags "--channels-last --fused-projections;--cuda-graphs;--cuda-graphs --channels-last --fused-projections"
python3 bench/e2e.py --model .gpu/tiny2 --sdxld "$sdxld" --steps 4 --cuda-only --check-device "$device" \
  --check-dtype "${DTYPE:-bfloat16}" --cuda-flags "--attention-backend cudnn;--attention-backend efficient;--vae-band-rows 16"

variants="${VARIANTS-graphs=--cuda-graphs;cl=--channels-last;fused=--fused-projections;cudnn=--cudnn-benchmark;all=--cuda-graphs --channels-last --fused-projections --cudnn-benchmark;cudnn-attn=--attention-backend cudnn;bands=--vae-band-rows 128;offload=--memory-budget @TIGHT_BUDGET@;a1111=--prompt-syntax a1111 --negative-prompt blurry;a1111-masked=--prompt-syntax a1111 --negative-prompt blurry,BREAK,grainy}"
left=$(( ${DEADLINE_S:-570} - (SECONDS - started) ))
[ "$left" -gt 0 ] || { echo "no time left for the full-size model"; exit 1; }
timeout -s INT "$left" python3 bench/gpu_full.py --sdxld "$sdxld" --vocab .gpu/clip_vocab --device "$device" \
  --model "${MODEL:-/tmp/sdxl-random}" --dtype "${DTYPE:-bfloat16}" --sizes "${SIZES:-1024,768}" \
  --batches "${BATCHES:-1,4}" --runs "${RUNS:-3}" --steps "${STEPS:-30}" --batch-steps "${STEPS:-20}" \
  --profile --out "$folded" --variants "$variants"
echo "gpu_full.py exit $? after $(( SECONDS - started )) s"
