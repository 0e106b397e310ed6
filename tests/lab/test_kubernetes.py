"""deploy/kubernetes: the manifests validate against the Kubernetes API schema (kubernetes-validate, offline and
strict), and agree with the code: the image compose builds, each tier's port, /healthz probes, volumes, flags,
SPLITLLM_* settings, the Services the tiers call, TLS names that cover every URL a tier calls, and credentials
from make-secrets.sh that give each pod its own identity and nothing else (the init containers run here)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

from deploy_helpers import CLASSES, tier_settings  # noqa: E402
from shared.http.service import settings_parser, tier_security  # noqa: E402
from shared.lab.compose import IMAGE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
NAMESPACE = "splitllm"
TIER_SECRETS = {"cloud": "splitllm-cloud-credential", "edge": "splitllm-edge-credentials",
                "user": "splitllm-user-credentials"}


def resources() -> list[Path]:
    return [K8S / name for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]]


def documents() -> list[dict]:
    return [d for path in resources() for d in yaml.safe_load_all(path.read_text()) if d]


def workloads() -> list[dict]:
    return [d for d in documents() if d["kind"] in ("StatefulSet", "Deployment")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def tier_of(workload: dict) -> str:
    return pod_spec(workload)["containers"][0]["args"][0]


def pod_names(workload: dict) -> list[str]:
    """A StatefulSet's pods: <name>-0 .. <name>-<replicas - 1>."""
    return [f"{workload['metadata']['name']}-{i}" for i in range(workload["spec"]["replicas"])]


def env_of(container: dict, pod: str) -> dict[str, str]:
    """The container's environment as the kubelet makes it in pod ``pod``: the pod's fields, $(VAR) expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        else:  # the tiers take no Secret through their environment: only the pod's own fields
            env[item["name"]] = {"metadata.name": pod, "metadata.namespace": NAMESPACE}[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def settings_of(workload: dict, monkeypatch: pytest.MonkeyPatch, pod: str | None = None,
                env: dict[str, str] | None = None):
    """The tier's settings in pod ``pod`` (default: the workload's first), ``env`` over the container's own."""
    container = pod_spec(workload)["containers"][0]
    return tier_settings(container["args"][0], {**env_of(container, pod or pod_names(workload)[0]), **(env or {})},
                         container["args"][1:], monkeypatch)


def mounts_of(container: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    """What make-secrets.sh writes (credentials with this interpreter's splitllm, TLS with openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("make-secrets.sh needs openssl")
    out = tmp_path_factory.mktemp("secrets")
    subprocess.run(["sh", str(K8S / "make-secrets.sh"), NAMESPACE, str(out)], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "PYTHON": sys.executable})
    return out


def secrets_of(out: Path) -> dict[str, dict[str, bytes]]:
    """The Secrets of secrets.yaml: name -> key -> the file the kubelet would mount."""
    return {d["metadata"]["name"]: {k: base64.b64decode(v) for k, v in d["data"].items()}
            for d in yaml.safe_load_all((out / "secrets.yaml").read_text()) if d}


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


@pytest.mark.parametrize("tier", ["cloud", "edge", "user"])
def test_each_tier_runs_the_compose_image_on_its_own_port_with_probes(tier, monkeypatch) -> None:
    workload = next(w for w in workloads() if tier_of(w) == tier)
    assert workload["kind"] == "StatefulSet"  # stable pod names: the ids their credentials name
    pod = pod_spec(workload)
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    for key in env_of(container, pod_names(workload)[0]):
        if key.startswith("SPLITLLM_"):
            assert key[len("SPLITLLM_"):].lower() in CLASSES[tier].model_fields, key
    parser = settings_parser(tier, CLASSES[tier])
    for arg in container["args"][1:]:
        if arg.startswith("--"):
            assert arg in parser._option_string_actions, arg
    s = settings_of(workload, monkeypatch)
    s.check_security()
    assert s.host == "0.0.0.0" and s.ssl_certfile and s.ssl_keyfile and s.ca_file
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [s.port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports[get["port"]] == s.port and get["scheme"] == "HTTPS", probe
    mounts = mounts_of(container)
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
    settings = {tier_of(w): (w, settings_of(w, monkeypatch)) for w in workloads()}
    cloud, edge = (urlparse(u) for u in (settings["edge"][1].cloud, settings["user"][1].edge))
    assert (cloud.hostname, cloud.port) == ("splitllm-cloud", services["splitllm-cloud"]["spec"]["ports"][0]["port"])
    assert (edge.hostname, edge.port) == ("splitllm-edge", services["splitllm-edge"]["spec"]["ports"][0]["port"])
    # a pod's own name: <pod>.<its StatefulSet's headless Service>.<namespace>.svc.cluster.local
    for tier in ("edge", "user"):
        workload, s = settings[tier]
        governing = workload["spec"]["serviceName"]
        assert services[governing]["spec"]["clusterIP"] == "None"
        assert urlparse(s.public_url).hostname == f"{pod_names(workload)[0]}.{governing}.{NAMESPACE}.svc.cluster.local"


def test_the_secrets_validate_and_keep_the_deployment_key_and_the_admin_off_the_cluster(secrets_dir) -> None:
    validate = subprocess.run([str(Path(sys.executable).with_name("kubernetes-validate")), "--strict", "--no-warn",
                               str(secrets_dir / "secrets.yaml")], capture_output=True, text=True, timeout=120)
    assert validate.returncode == 0, validate.stdout[-2000:]
    secrets = secrets_of(secrets_dir)
    replicas = {tier_of(w): pod_names(w) for w in workloads()}
    assert set(secrets) == {*TIER_SECRETS.values(), "splitllm-tls"}
    assert set(secrets["splitllm-cloud-credential"]) == {"credential.json", "deployment.pub"}
    for tier in ("edge", "user"):  # one credential per pod of the StatefulSet, named as the pod
        assert set(secrets[TIER_SECRETS[tier]]) == {f"{pod}.json" for pod in replicas[tier]} | {"deployment.pub"}
    assert set(secrets["splitllm-tls"]) == {"tls.crt", "tls.key", "ca.crt"}
    kept = [(secrets_dir / "credentials" / name).read_bytes().strip() for name in ("deployment.key", "admin.token")]
    kept.append((secrets_dir / "ca.key").read_bytes().strip())
    for name, data in secrets.items():
        for key, value in data.items():
            assert not any(k in value for k in kept), f"{name}/{key} holds what must stay on the operator's machine"


@pytest.mark.parametrize("tier", ["cloud", "edge", "user"])
def test_each_pod_gets_its_own_credential_and_no_other(tier, secrets_dir, tmp_path, monkeypatch) -> None:
    """Each pod as the kubelet would make it: its Secret volumes filled from secrets.yaml, its init container's
    script run; the tier then starts (its credential checked against the trust key) as the pod's own identity,
    and its container mounts no Secret holding another pod's credential."""
    workload = next(w for w in workloads() if tier_of(w) == tier)
    pod = pod_spec(workload)
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_names = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
    assert secret_names == {TIER_SECRETS[tier], "splitllm-tls"}  # no other tier's Secret reaches this pod
    own = next(name for name, v in volumes.items() if v.get("secret", {}).get("secretName") == TIER_SECRETS[tier])
    secrets = secrets_of(secrets_dir)
    env = env_of(container, pod_names(workload)[0])
    credential, trust_key = Path(env["SPLITLLM_CREDENTIAL"]), Path(env["SPLITLLM_TRUST_KEY"])
    assert credential.parent == trust_key.parent
    mounted = volumes[mounts_of(container)[str(credential.parent)]]
    for ordinal, name in enumerate(pod_names(workload)):
        root = tmp_path / name
        if tier == "cloud":  # one pod: its own Secret, mounted as it is
            assert mounted["name"] == own
            files = root / "secret"
            files.mkdir(parents=True)
            for key, value in secrets[TIER_SECRETS[tier]].items():
                (files / key).write_bytes(value)
        else:  # the Secret holds every pod's: only the init container mounts it, and copies the pod's own out
            assert "emptyDir" in mounted and mounted["emptyDir"]["medium"] == "Memory"
            assert own not in mounts_of(container).values()
            (init,) = pod["initContainers"]
            init_env = env_of(init, name)
            assert mounts_of(init) == {init_env["FROM"]: own, init_env["TO"]: mounted["name"]}
            source, files = root / "secret", root / "credential"
            source.mkdir(parents=True)
            files.mkdir()
            for key, value in secrets[TIER_SECRETS[tier]].items():
                (source / key).write_bytes(value)
            assert init["command"][:2] == ["sh", "-c"]
            run = subprocess.run(init["command"], env={**init_env, "FROM": str(source), "TO": str(files),
                                                       "PATH": os.environ["PATH"]},
                                 capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, run.stderr
            assert sorted(f.name for f in files.iterdir()) == ["credential.json", "deployment.pub"]
            assert (files / "credential.json").stat().st_mode & 0o777 == 0o400
        s = settings_of(workload, monkeypatch, name, {"SPLITLLM_CREDENTIAL": str(files / credential.name),
                                                      "SPLITLLM_TRUST_KEY": str(files / trust_key.name)})
        principal = tier_security(s, tier).principal
        assert (principal.role, principal.id) == (tier, "cloud" if tier == "cloud" else name)
        if tier == "user":
            assert principal.client == ordinal
    if tier != "cloud":  # a pod without a credential of its own does not start
        (init,) = pod["initContainers"]
        run = subprocess.run(init["command"], env={"FROM": str(tmp_path / pod_names(workload)[0] / "secret"),
                                                   "TO": str(tmp_path), "POD_NAME": f"{workload['metadata']['name']}-99",
                                                   "PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=30)
        assert run.returncode == 1 and "make-secrets.sh issues one per replica" in run.stderr


def test_the_certificate_covers_every_name_a_tier_calls(secrets_dir, monkeypatch) -> None:
    urls = []
    for w in workloads():
        for pod in pod_names(w):
            s = settings_of(w, monkeypatch, pod)
            urls += [s.public_url] if s.public_url else []
            urls += [getattr(s, "cloud", None), getattr(s, "edge", None)]
    hosts = {urlparse(u).hostname for u in urls if u} | {f"splitllm-cloud.{NAMESPACE}.svc"}
    for host in sorted(hosts):
        out = subprocess.run(["openssl", "x509", "-in", str(secrets_dir / "tls.crt"), "-noout", "-checkhost", host],
                             capture_output=True, text=True, check=True).stdout
        assert "does match" in out, out
    subprocess.run(["openssl", "verify", "-CAfile", str(secrets_dir / "ca.crt"), str(secrets_dir / "tls.crt")], check=True,
                   capture_output=True)
