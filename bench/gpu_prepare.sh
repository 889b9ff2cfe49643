#!/usr/bin/env bash
# Gathers under .gpu/ what the GPU check scripts (bench/gpu_*.sh) take to a CUDA machine
# that has PyTorch but neither Rust nor a package registry: the release binary, the tiny2
# fixture pipeline, CLIP's vocabulary for the full-size model's tokenizers, and the
# wheels that machine lacks (diffusers at the version the fixtures use). About 60 MiB:
# carry `.gpu` to the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup
cargo build --release --quiet
fixtures="$(python tests/fixtures/make_fixtures.py --out "$SDXLD_CACHE/fixtures" | tail -n 1)"
rm -rf .gpu
mkdir -p .gpu/whl
# Symbols stripped: the carried tree is limited to 64 MiB.
strip -o .gpu/sdxld "$CARGO_TARGET_DIR/release/sdxld"
cp -r "$fixtures/tiny2/pipeline" .gpu/tiny2
mkdir .gpu/clip_vocab
cp "$fixtures/clip_vocab/vocab.json" "$fixtures/clip_vocab/merges.txt" .gpu/clip_vocab/
diffusers="$(python -c 'import diffusers; print(diffusers.__version__)')"
python -m pip download --quiet --no-deps --dest .gpu/whl "diffusers==$diffusers" importlib_metadata zipp
du -sh .gpu
