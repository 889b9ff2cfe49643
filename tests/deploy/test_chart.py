"""The Helm chart, checked offline: linted and rendered with the Helm SDK (helm-python-sdk)
for the default values and every ci/*-values.yaml, the manifests validated against two
Kubernetes versions' schemas (kubernetes-validate --strict), trivy's Kubernetes checks
at HIGH/CRITICAL, yamllint on the plain YAML, the rendered config accepted by the
binary, assertions on the objects, and bad values refused."""

import os
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sdxld"
BINARY = os.environ.get("SDXLD_BIN", str(ROOT / "target" / "release" / "sdxld"))
KUBERNETES = ("1.30.0", "1.37.0")
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CASES = {"default": {}} | {p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) for p in CI_VALUES}


def render(values: dict) -> dict:
    """The rendered objects by (kind, name); the NOTES under ("NOTES", "")."""
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    out = {}
    for path, text in chart.render(values, name="gen", namespace="ai").items():
        if path.endswith("NOTES.txt"):
            out[("NOTES", "")] = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def kinds(objects: dict, kind: str) -> list:
    return [o for (k, _), o in objects.items() if k == kind]


def deployment(objects: dict) -> dict:
    (d,) = kinds(objects, "Deployment")
    return d


def container(objects: dict) -> dict:
    return deployment(objects)["spec"]["template"]["spec"]["containers"][0]


def test_ci_values_cover_gpu_tls_autoscaling_and_existing_secrets():
    assert {"gpu", "tls", "autoscaling", "existing-secrets"} <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_is_clean(case):
    report = helm.lint(str(CHART), CASES[case], strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_validate_against_two_kubernetes_versions_and_trivy(case, tmp_path):
    objects = render(CASES[case])
    builtin = [o for o in objects.values() if isinstance(o, dict) and o["apiVersion"] != "monitoring.coreos.com/v1"]
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(yaml.safe_dump_all(builtin))
    for version in KUBERNETES:
        result = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", "-k", version, str(manifests)],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, f"{version}: {result.stdout}{result.stderr}"
    result = subprocess.run(
        ["trivy", "config", "--skip-check-update", "--quiet", "--severity", "HIGH,CRITICAL", "--exit-code", "1", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_validation_and_trivy_catch_bad_manifests(tmp_path):
    """The checks above can fail: an unknown field, and a privileged root container."""
    bad = render({})
    pod = deployment(bad)["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"] = {"privileged": True, "runAsUser": 0, "allowPrivilegeEscalation": True}
    pod["securityContext"] = {}
    pod["containers"][0]["surprise"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment(bad)))
    result = subprocess.run(["kubernetes-validate", "--strict", "--quiet", "-k", KUBERNETES[0], str(path)], capture_output=True, text=True)
    assert result.returncode != 0 and "surprise" in result.stdout + result.stderr
    result = subprocess.run(
        ["trivy", "config", "--skip-check-update", "--quiet", "--severity", "HIGH,CRITICAL", "--exit-code", "1", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stdout


def test_plain_yaml_passes_yamllint():
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *CI_VALUES]
    result = subprocess.run(["yamllint", "-c", str(CHART.parent / ".yamllint"), *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_rendered_config_is_one_sdxld_accepts(case, tmp_path):
    (config_map,) = kinds(render(CASES[case]), "ConfigMap")
    path = tmp_path / "config.toml"
    path.write_text(config_map["data"]["config.toml"])
    result = subprocess.run([BINARY, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    tls = CASES[case].get("tls", {}).get("enabled", False)
    assert f"tls {str(tls).lower()}" in result.stdout


def test_default_pod_has_a_gpu_probes_and_a_restricted_security_context():
    objects = render({})
    spec = deployment(objects)["spec"]
    pod = spec["template"]["spec"]
    c = container(objects)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    # Probes on the plaintext health port: startup and readiness wait for the model,
    # liveness asks the process only.
    assert c["startupProbe"]["grpc"] == {"port": 50052, "service": "sdxld.v1.GenerationService"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    assert c["readinessProbe"]["grpc"]["service"] == "sdxld.v1.GenerationService"
    assert c["livenessProbe"]["grpc"] == {"port": 50052, "service": ""}
    # The pod outlives sdxld's drain.
    import tomllib

    (config_map,) = kinds(objects, "ConfigMap")
    config = tomllib.loads(config_map["data"]["config.toml"])
    assert pod["terminationGracePeriodSeconds"] > config["server"]["shutdown_grace_seconds"]
    assert config["server"]["health_listen"].endswith(":50052")
    # Pod security: restricted.
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/var/lib/sdxld", "/models"} <= mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert "persistentVolumeClaim" in volumes["models"]
    (sa,) = kinds(objects, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    # Optional objects are off by default; the checksums restart pods on change.
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "Secret"):
        assert not kinds(objects, kind), kind
    annotations = deployment(objects)["spec"]["template"]["metadata"]["annotations"]
    changed = render({"config": {"jobs": {"max_queued": 3}}})
    assert deployment(changed)["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != annotations["checksum/config"]
    # `helm test` calls the health service; NOTES show grpcurl.
    (test_pod,) = [p for p in kinds(objects, "Pod") if p["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    assert test_pod["spec"]["containers"][0]["args"] == ["health", "--server", "gen-sdxld:50052"]
    assert "grpcurl -plaintext" in objects[("NOTES", "")]


def test_gpu_values_place_the_pod_on_gpu_nodes():
    objects = render(CASES["gpu"])
    pod = deployment(objects)["spec"]["template"]["spec"]
    c = container(objects)
    assert c["image"].startswith("registry.example.com/ml/sdxld@sha256:")
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "inference-high"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert deployment(objects)["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    env = {e["name"]: e for e in c["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4317"
    assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (monitor,) = kinds(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    other = render({"gpu": {"resourceName": "amd.com/gpu", "count": 2}})
    assert container(other)["resources"]["limits"]["amd.com/gpu"] == 2


def test_tls_values_mount_certificates_and_tokens_the_config_names():
    import tomllib

    objects = render(CASES["tls"])
    (config_map,) = kinds(objects, "ConfigMap")
    server = tomllib.loads(config_map["data"]["config.toml"])["server"]
    assert server["tls"] == {
        "cert": "/etc/sdxld/tls/tls.crt",
        "key": "/etc/sdxld/tls/tls.key",
        "client_ca": "/etc/sdxld/client-ca/ca.crt",
        "client_auth": "required",
    }
    assert server["tokens_file"] == "/etc/sdxld/tokens/tokens"
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    assert mounts["tls"] == "/etc/sdxld/tls" and mounts["client-ca"] == "/etc/sdxld/client-ca" and mounts["tokens"] == "/etc/sdxld/tokens"
    secrets = {s["metadata"]["name"]: s for s in kinds(objects, "Secret")}
    assert secrets["gen-sdxld-tls"]["type"] == "kubernetes.io/tls"
    assert "ops:admin:admin-0123456789abcdef" in secrets["gen-sdxld-tokens"]["stringData"]["tokens"]
    assert "-insecure" in objects[("NOTES", "")] and "authorization: Bearer" in objects[("NOTES", "")]


def test_existing_secrets_are_used_as_they_are():
    objects = render(CASES["existing-secrets"])
    assert not kinds(objects, "Secret") and not kinds(objects, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "sdxld-server-tls"
    assert volumes["client-ca"]["secret"] == {"secretName": "corporate-ca", "items": [{"key": "bundle.pem", "path": "ca.crt"}]}
    assert volumes["tokens"]["secret"] == {"secretName": "sdxld-tokens", "items": [{"key": "tokens.txt", "path": "tokens"}]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "shared-sdxl-models"
    env = {e["name"]: e.get("value") for e in container(objects)["env"]}
    assert env["OTEL_EXPORTER_OTLP_CERTIFICATE"] == "/etc/sdxld/otel-ca/ca.crt"


def test_autoscaling_scales_on_queue_depth_with_a_disruption_budget():
    objects = render(CASES["autoscaling"])
    (hpa,) = kinds(objects, "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "sdxld_queue_depth_jobs"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert "replicas" not in deployment(objects)["spec"]
    (pdb,) = kinds(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert kinds(render({"replicaCount": 3}), "PodDisruptionBudget")


@pytest.mark.parametrize(
    "values",
    [
        {"gpu": {"count": 0}},
        {"tls": {"clientAuth": "maybe"}},
        {"image": {"digest": "latest"}},
        {"auth": {"tokens": [{"name": "ops", "role": "root", "secret": "0123456789abcdefgh"}]}},
        {"auth": {"tokens": [{"name": "ops", "role": "admin", "secret": "short"}]}},
        {"podSecurityContext": {"runAsNonRoot": False}},
        {"config": {"sever": {"listen": "0.0.0.0:1"}}},
        {"replicas": 2},
    ],
)
def test_bad_values_are_refused_by_the_schema(values):
    with pytest.raises(helm.HelmError):
        helm.Chart.load(str(CHART)).validate_schema(values)


def test_a_surging_gpu_rollout_and_missing_tls_material_fail_to_render():
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError, match="maxSurge"):
        chart.render({"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}, name="gen", namespace="ai")
    with pytest.raises(helm.HelmError, match="tls.cert"):
        chart.render({"tls": {"enabled": True}}, name="gen", namespace="ai")
