# syntax=docker/dockerfile:1.7
# sdxld: a builder with Rust and PyPI's torch wheel (tch links the libtorch inside it),
# then a slim runtime holding the binary and only what it loads: torch/lib and the
# nvidia/* CUDA libraries the wheel brings. The node's NVIDIA driver comes from the
# container toolkit, so no CUDA base image is needed. Build with BuildKit:
#   docker build -t sdxld .
# Expected size: about 3.9 GB uncompressed (nvidia/ 2.9 GB, torch/lib 1.0 GB, the
# binary 27 MB, debian:bookworm-slim 75 MB), as tests/deploy measures it.

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
ARG TORCH_VERSION=2.11.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# The venv's path is baked into the binary's rpath (build.rs): the runtime keeps it.
ENV VIRTUAL_ENV=/opt/sdxld/venv
RUN python3 -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir "torch==${TORCH_VERSION}"
ENV PATH="/opt/sdxld/venv/bin:${PATH}" \
    LIBTORCH_USE_PYTORCH=1 \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY benches benches
COPY config config
COPY csrc csrc
COPY proto proto
COPY src src
# Registry and build caches persist across builds; the binary leaves the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sdxld \
    && install -D -m 0755 target/release/sdxld /out/usr/local/bin/sdxld
# Only the libraries libtorch loads, at their own paths.
RUN site="$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')" \
    && mkdir -p "/out${site}/torch" \
    && cp -a "${site}/torch/lib" "/out${site}/torch/lib" \
    && cp -a "${site}/nvidia" "/out${site}/nvidia"

FROM ${RUNTIME_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sdxld \
    && useradd --system --uid 10001 --gid sdxld --home-dir /var/lib/sdxld --shell /usr/sbin/nologin sdxld \
    && mkdir -p /models/base /models/refiner /models/vae /models/lora /models/controlnet /models/upscaler /models/preprocessor /var/lib/sdxld \
    && chown -R sdxld:sdxld /var/lib/sdxld
COPY --from=builder /out/ /
# Writes go only to the data folder (the demo model, caches) and /tmp: the root
# filesystem may be read-only.
ENV SDXLD_CACHE=/var/lib/sdxld/cache \
    HOME=/var/lib/sdxld \
    SDXLD__SERVER__LISTEN=0.0.0.0:50051 \
    SDXLD__SERVER__HEALTH_LISTEN=0.0.0.0:50052 \
    SDXLD__SERVER__METRICS_LISTEN=0.0.0.0:9464 \
    SDXLD__ENGINE__DEVICE=auto \
    SDXLD__MODELS__BASE_ROOTS=/models/base \
    SDXLD__MODELS__REFINER_ROOTS=/models/refiner \
    SDXLD__MODELS__VAE_ROOTS=/models/vae \
    SDXLD__MODELS__LORA_ROOTS=/models/lora \
    SDXLD__MODELS__CONTROLNET_ROOTS=/models/controlnet \
    SDXLD__MODELS__UPSCALER_ROOTS=/models/upscaler \
    SDXLD__MODELS__PREPROCESSOR_ROOTS=/models/preprocessor \
    SDXLD__MODELS__EMBEDDING_ROOTS=/models/embeddings \
    SDXLD__MODELS__IP_ADAPTER_ROOTS=/models/ip-adapter \
    SDXLD__MODELS__IMAGE_ENCODER_ROOTS=/models/image-encoder \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/models", "/var/lib/sdxld"]
USER 10001:10001
WORKDIR /var/lib/sdxld
# gRPC, plaintext health (kubelet probes), Prometheus metrics.
EXPOSE 50051 50052 9464
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["/usr/local/bin/sdxld", "health", "--server", "127.0.0.1:50052"]
ENTRYPOINT ["/usr/local/bin/sdxld"]
CMD ["serve"]
