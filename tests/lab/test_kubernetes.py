"""deploy/kubernetes: the manifests validate against the Kubernetes API schema (kubernetes-validate, offline and
strict), and agree with the code: the image compose builds, each tier's port, /healthz probes, volumes, flags,
SPLITLLM_* settings, the Services the tiers call, and TLS names that cover every URL a tier calls."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

from deploy_helpers import CLASSES, tier_settings  # noqa: E402
from shared.http.service import settings_parser  # noqa: E402
from shared.lab.compose import IMAGE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
NAMESPACE = "splitllm"
POD = {"POD_NAME": "splitllm-edge-5d8f7-x2x9q", "POD_NAMESPACE": NAMESPACE}


def resources() -> list[Path]:
    return [K8S / name for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]]


def documents() -> list[dict]:
    return [d for path in resources() for d in yaml.safe_load_all(path.read_text()) if d]


def workloads() -> list[dict]:
    return [d for d in documents() if d["kind"] in ("StatefulSet", "Deployment")]


def env_of(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet makes it: secrets as stand-ins, $(VAR) expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = f"stand-in-{item['valueFrom']['secretKeyRef']['key']}"
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.name": POD["POD_NAME"], "metadata.namespace": POD["POD_NAMESPACE"]}.get(path, "0")
    return env


def settings_of(container: dict, monkeypatch: pytest.MonkeyPatch):
    return tier_settings(container["args"][0], env_of(container), container["args"][1:], monkeypatch)


def test_the_manifests_validate_against_the_kubernetes_api_schema() -> None:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    if not tool.exists():
        pytest.fail("kubernetes-validate is not installed: `make setup` installs the test extras")
    files = [str(p) for p in resources()] + [str(K8S / "kustomization.yaml")]
    proc = subprocess.run([str(tool), "--strict", "--no-warn", *files[:-1]], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.count("passed") == len(documents())


def test_the_kustomization_lists_every_manifest() -> None:
    listed = {p.name for p in resources()}
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("kind,tier", [("StatefulSet", "cloud"), ("Deployment", "edge"), ("StatefulSet", "user")])
def test_each_tier_runs_the_compose_image_on_its_own_port_with_probes(kind, tier, monkeypatch) -> None:
    workload = next(w for w in workloads() if w["spec"]["template"]["spec"]["containers"][0]["args"][0] == tier)
    assert workload["kind"] == kind
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    for key in env_of(container):
        if key.startswith("SPLITLLM_"):
            assert key[len("SPLITLLM_"):].lower() in CLASSES[tier].model_fields, key
    parser = settings_parser(tier, CLASSES[tier])
    for arg in container["args"][1:]:
        if arg.startswith("--"):
            assert arg in parser._option_string_actions, arg
    s = settings_of(container, monkeypatch)
    s.check_security()
    assert s.host == "0.0.0.0" and s.ssl_certfile and s.ssl_keyfile and s.ca_file
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [s.port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports[get["port"]] == s.port and get["scheme"] == "HTTPS", probe
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (s.ssl_certfile, s.ssl_keyfile, s.ca_file):
        mount = str(Path(path).parent)
        assert volumes[mounts[mount]]["secret"]["secretName"] == "splitllm-tls"
        assert Path(path).name in ("tls.crt", "tls.key", "ca.crt")
    if tier == "cloud":  # the store on the persistent volume
        claims = {c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]}
        assert mounts[str(s.data_dir)] in claims
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests["memory"] and limits["memory"]
    assert "$(" not in (s.public_url or "")


def test_services_reach_the_tiers_on_their_ports(monkeypatch) -> None:
    services = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "Service"}
    pods = {w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: w for w in workloads()}
    for name, svc in services.items():
        workload = pods[svc["spec"]["selector"]["app.kubernetes.io/name"]]
        container = workload["spec"]["template"]["spec"]["containers"][0]
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in svc["spec"]["ports"]:
            assert names[port["targetPort"]] == port["port"], name
    settings = {w["spec"]["template"]["spec"]["containers"][0]["args"][0]:
                (w, settings_of(w["spec"]["template"]["spec"]["containers"][0], monkeypatch)) for w in workloads()}
    cloud, edge, user = (urlparse(u) for u in (settings["edge"][1].cloud, settings["user"][1].edge,
                                               settings["edge"][1].public_url))
    assert (cloud.hostname, cloud.port) == ("splitllm-cloud", services["splitllm-cloud"]["spec"]["ports"][0]["port"])
    assert (edge.hostname, edge.port) == ("splitllm-edge", services["splitllm-edge"]["spec"]["ports"][0]["port"])
    # a pod's own name: <pod>.<its headless Service>.<namespace>.svc.cluster.local
    edge_pod = settings["edge"][0]["spec"]["template"]["spec"]
    assert user.hostname == f"{POD['POD_NAME']}.{edge_pod['subdomain']}.{NAMESPACE}.svc.cluster.local"
    assert services[edge_pod["subdomain"]]["spec"]["clusterIP"] == "None"
    user_set = settings["user"][0]
    assert services[user_set["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    assert urlparse(settings["user"][1].public_url).hostname.split(".")[1] == user_set["spec"]["serviceName"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_the_certificate_covers_every_name_a_tier_calls(tmp_path, monkeypatch) -> None:
    subprocess.run(["sh", str(K8S / "make-secrets.sh"), NAMESPACE, str(tmp_path)], check=True, capture_output=True,
                   timeout=120)
    validate = subprocess.run([str(Path(sys.executable).with_name("kubernetes-validate")), "--strict", "--no-warn",
                               str(tmp_path / "secrets.yaml")], capture_output=True, text=True, timeout=120)
    assert validate.returncode == 0, validate.stdout[-2000:]
    secrets = list(yaml.safe_load_all((tmp_path / "secrets.yaml").read_text()))
    assert {s["metadata"]["name"] for s in secrets} == {"splitllm-tokens", "splitllm-tls"}
    assert set(secrets[0]["stringData"]) == {"token", "admin-token"}
    assert set(secrets[1]["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    urls = []
    for w in workloads():
        s = settings_of(w["spec"]["template"]["spec"]["containers"][0], monkeypatch)
        urls += [s.public_url] if s.public_url else []
        urls += [getattr(s, "cloud", None), getattr(s, "edge", None)]
    hosts = {urlparse(u).hostname for u in urls if u} | {f"splitllm-cloud.{NAMESPACE}.svc"}
    for host in sorted(hosts):
        out = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "tls.crt"), "-noout", "-checkhost", host],
                             capture_output=True, text=True, check=True).stdout
        assert "does match" in out, out
    subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")], check=True,
                   capture_output=True)
