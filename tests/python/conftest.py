"""Fixtures: the sdxld binary serving the demo model on loopback, and Python stubs
generated from proto/ with grpcio-tools at test time."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    include = Path(protoc.__file__).parent / "_proto"
    protos = [str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto")]
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    assert protoc.main(args) == 0, args
    local = ROOT / "tests" / "python" / "protos"
    args = ["protoc", f"-I{local}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", "health.proto", "rpc_status.proto"]
    assert protoc.main(args) == 0, args
    sys.path.insert(0, str(out))
    import health_pb2
    import health_pb2_grpc
    import rpc_status_pb2
    from sdxld.v1 import generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc

    class Stubs:
        pass

    s = Stubs()
    s.gen, s.gen_grpc, s.models, s.models_grpc = generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc
    s.health, s.health_grpc, s.rpc = health_pb2, health_pb2_grpc, rpc_status_pb2
    return s


class Server:
    def __init__(self, lora_root: Path, upscaler_root: Path, extra_env=None):
        binary = os.environ.get("SDXLD_BIN", str(ROOT / "target" / "release" / "sdxld"))
        # The LoRA, upscaler, preprocessor, embedding, IP-Adapter (also the image encoder
        # root) and ControlNet roots start empty; tests write
        # models into them (names resolve per request).
        self.lora_root = lora_root
        self.upscaler_root = upscaler_root
        self.preprocessor_root = lora_root.parent / f"{lora_root.name}-preprocessors"
        self.preprocessor_root.mkdir()
        self.embedding_root = lora_root.parent / f"{lora_root.name}-embeddings"
        self.embedding_root.mkdir()
        self.ip_adapter_root = lora_root.parent / f"{lora_root.name}-ip-adapters"
        self.ip_adapter_root.mkdir()
        self.controlnet_root = lora_root.parent / f"{lora_root.name}-controlnets"
        self.controlnet_root.mkdir()
        env = dict(
            os.environ,
            SDXLD__SERVER__METRICS_LISTEN="",
            SDXLD__ENGINE__DEVICE="cpu",
            SDXLD__MODELS__LORA_ROOTS=str(lora_root),
            SDXLD__MODELS__UPSCALER_ROOTS=str(upscaler_root),
            SDXLD__MODELS__PREPROCESSOR_ROOTS=str(self.preprocessor_root),
            SDXLD__MODELS__EMBEDDING_ROOTS=str(self.embedding_root),
            SDXLD__MODELS__IP_ADAPTER_ROOTS=str(self.ip_adapter_root),
            SDXLD__MODELS__IMAGE_ENCODER_ROOTS=str(self.ip_adapter_root),
            SDXLD__MODELS__CONTROLNET_ROOTS=str(self.controlnet_root),
            **(extra_env or {}),
        )
        self.process = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.address = None
        self.health_address = None
        deadline = time.time() + 120
        for line in self.process.stdout:
            if line.startswith("sdxld health on "):
                self.health_address = line.split()[-1]
            if line.startswith("sdxld listening on "):
                self.address = line.split()[-1]
                break
            if time.time() > deadline:
                break
        assert self.address, "the server did not start"
        # Keep reading stdout so the server never blocks on it.
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_ready(stubs, address: str):
    """Polls the plaintext health service at `address` until generations are served."""
    health = stubs.health_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            reply = health.Check(stubs.health.HealthCheckRequest(service="sdxld.v1.GenerationService"), timeout=2)
            if reply.status == stubs.health.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        time.sleep(0.1)


@pytest.fixture(scope="session")
def server(stubs, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("upscalers"))
    wait_ready(stubs, s.address)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tls_server(stubs, tmp_path_factory):
    """sdxld with TLS, required client certificates (trustme's CA), a `generate` token
    and a plaintext health port; yields (server, CA, client certificate, token)."""
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("python-client@example.com")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(folder / "server.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    env = dict(
        SDXLD__SERVER__TLS__CERT=str(folder / "server.pem"),
        SDXLD__SERVER__TLS__KEY=str(folder / "server.pem"),
        SDXLD__SERVER__TLS__CLIENT_CA=str(folder / "ca.pem"),
        SDXLD__SERVER__TLS__CLIENT_AUTH="required",
        SDXLD__SERVER__HEALTH_LISTEN="127.0.0.1:0",
        SDXLD__SERVER__TOKENS="py:generate:py-s3cret",
    )
    s = Server(tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("upscalers"), env)
    assert s.health_address, "no plaintext health port"
    wait_ready(stubs, s.health_address)
    yield s, ca, client_cert, "py-s3cret", folder
    s.stop()
