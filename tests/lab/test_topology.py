"""shared/lab/topology: the plan everywhere; real namespaces, veths and tc shaping where root can make them."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.lab import topology
from shared.lab.topology import lifecycle, network
from shared.protocol.links import get_profile
from shared.http.service import settings_parser
from shared.config.settings import CloudSettings, EdgeSettings, UserSettings

ROOT = Path(__file__).resolve().parents[2]
PREFIX = f"slt{os.getpid() % 100000}-"  # this test process's namespaces only
SUBNET = "10.78"
TOLERANCE = 0.20


# ---------------------------------------------------------------------------------------------
# the plan and the commands (no root needed)


def test_plan_addresses_and_rates() -> None:
    plan = topology.make_plan(4, 2, "4g", "fiber", prefix="sl-")
    g, f = get_profile("4g"), get_profile("fiber")
    assert plan.namespaces == {"cloud": "sl-cloud", "edge-0": "sl-edge0", "edge-1": "sl-edge1",
                               **{f"user-{i}": f"sl-user{i}" for i in range(4)}}
    nets = []
    for link in plan.links:
        a, b = (ipaddress.ip_interface(f"{end.addr}/30") for end in (link.a, link.b))
        assert a.network == b.network and a.ip != b.ip, link.name
        nets.append(a.network)
    assert len(set(nets)) == len(nets), "every link has its own /30"
    for i in range(4):
        link = topology.link_of(plan, f"user-{i}-edge-{i % 2}")  # users 0, 2 behind edge-0; 1, 3 behind edge-1
        assert (link.a.ns, link.b.ns) == (f"sl-user{i}", f"sl-edge{i % 2}")
        assert (link.a.egress_mbps, link.b.egress_mbps) == (g.up_mbps, g.down_mbps)
        assert topology.parent_addr(plan, f"user-{i}") == link.b.addr
    for e in range(2):
        link = topology.link_of(plan, f"edge-{e}-cloud")
        assert (link.a.ns, link.b.ns) == (f"sl-edge{e}", "sl-cloud")
        assert (link.a.egress_mbps, link.b.egress_mbps) == (f.up_mbps, f.down_mbps)
    host = topology.link_of(plan, "host-cloud")
    assert host.a.ns is None and host.a.dev == "sl-host" and host.a.egress_mbps is None
    with pytest.raises(ValueError, match="unknown link profile"):
        topology.make_plan(1, 1, "3g", "fiber")


def test_shaping_commands() -> None:
    g = get_profile("4g")
    (only,) = topology.shaping_commands("sl-user0", "edge", 10.0, g, netem=False)
    assert only[:4] == ["ip", "netns", "exec", "sl-user0"]
    assert only[4:12] == ["tc", "qdisc", "replace", "dev", "edge", "root", "handle", "1:"]
    assert "tbf" in only and "10mbit" in only
    first, second = topology.shaping_commands("sl-user0", "edge", 10.0, g, netem=True)
    assert "netem" in first and first[first.index("delay") + 1:first.index("delay") + 3] == ["30ms", "10ms"]
    assert first[first.index("loss") + 1] == "0.5%"
    assert "tbf" in second and second[second.index("parent") + 1] == "1:1"


def test_tier_commands_agree_with_cli(tmp_path: Path) -> None:
    plan = topology.make_plan(4, 2, "4g", "fiber")
    args = topology.split_tier_args(["--model", "tiny-bert", "--data", "trec", "--insecure-dev",
                                     "--request-timeout", "30", "--token", "secret"])
    assert args.cloud == ["--model", "tiny-bert", "--data", "trec"]
    assert sorted(args.common) == sorted(["--insecure-dev", "--request-timeout", "30"])
    assert args.common[args.common.index("--request-timeout") + 1] == "30"
    assert args.env == {"SPLITLLM_TOKEN": "secret"}  # never on a command line
    cmds = topology.tier_commands(plan, tmp_path, sys.executable, args)
    assert sorted(cmds) == sorted(plan.namespaces)
    classes = {"cloud": CloudSettings, "edge": EdgeSettings, "user": UserSettings}
    for name, cmd in cmds.items():
        assert cmd[:4] == ["ip", "netns", "exec", plan.namespaces[name]]
        tier = cmd[cmd.index("shared.lab.cli") + 1]
        parsed = settings_parser(tier, classes[tier]).parse_args(cmd[cmd.index("shared.lab.cli") + 2:])
        assert parsed.insecure_dev and parsed.request_timeout == "30"
        if tier != "cloud":
            assert parsed.public_url == f"http://{plan.addrs[name]}:{topology.PORTS[tier]}"
            parent = parsed.edge if tier == "user" else parsed.cloud
            parent_port = topology.PORTS["edge" if tier == "user" else "cloud"]
            assert parent == f"http://{topology.parent_addr(plan, name)}:{parent_port}"
        else:
            assert parsed.model == "tiny-bert" and parsed.num_clients == "4"
    emulated = topology.tier_commands(plan, tmp_path, sys.executable, args, emulate=True)  # a kernel without netem
    for name, cmd in emulated.items():
        tier = cmd[cmd.index("shared.lab.cli") + 1]
        if tier == "cloud":
            assert cmd == cmds[name]
            continue
        parsed = settings_parser(tier, classes[tier]).parse_args(cmd[cmd.index("shared.lab.cli") + 2:])
        assert parsed.link_profile == ("4g" if tier == "user" else "fiber") and parsed.link_rate_shaped
    for bad in (["--host", "1.2.3.4"], ["--no-such-flag", "1"]):
        with pytest.raises(SystemExit):
            topology.split_tier_args(bad)


# ---------------------------------------------------------------------------------------------
# real namespaces


def _probe() -> str | None:
    problem = topology.requirements_problem()
    if problem:
        return problem
    ns = f"{PREFIX}probe"
    steps = [["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"],
             ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "pa", "root", "tbf", "rate", "10mbit",
              "burst", "16kb", "latency", "50ms"]]
    try:
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            if r.returncode != 0:
                return f"`{' '.join(cmd)}` failed here: {r.stderr.strip()}"
        return None
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


_PROBLEM = _probe()
needs_netns = pytest.mark.skipif(_PROBLEM is not None,
                                 reason=f"needs root, ip/tc and network namespaces with veth + tbf: {_PROBLEM}")


def ours() -> list[str]:
    return [ns for ns in topology.list_namespaces() if ns.startswith(PREFIX)]


@pytest.fixture
def workdir(tmp_path: Path):
    yield tmp_path / "topology"
    topology.down(tmp_path / "topology", quiet=True, sweep_prefix=PREFIX)  # whatever a failed test left
    assert not ours()


def within(measured: float, expected: float) -> bool:
    return abs(measured - expected) <= TOLERANCE * expected


def shaped_rate(src: str, dst: str, addr: str, nbytes: int, expected: float) -> float:
    """The transfer rate, measured again once if the first reading is off: a TCP flow that loses
    packets at the tbf queue early on backs off and under-reads (a busy 2-core CI box once read
    7.8 Mbit/s for a 10 Mbit/s profile). A shaper that is wrong is wrong on both readings."""
    rate = topology.measure_rate(src, dst, addr, nbytes)
    if within(rate, expected):
        return rate
    again = topology.measure_rate(src, dst, addr, nbytes)
    return again if abs(again - expected) < abs(rate - expected) else rate


@needs_netns
def test_up_shapes_user_edge_link_then_down(workdir: Path) -> None:
    g = get_profile("4g")
    rc = topology.main(["up", "--no-tiers", "--users", "1", "--edges", "1", "--profile", "4g",
                        "--edge-profile", "fiber", "--prefix", PREFIX, "--subnet", SUBNET, "--workdir", str(workdir)])
    assert rc == 0
    state = topology.State.load(workdir).data
    assert sorted(state["namespaces"]) == sorted([f"{PREFIX}cloud", f"{PREFIX}edge0", f"{PREFIX}user0"])
    assert sorted(ours()) == sorted(state["namespaces"])
    assert state["procs"] == [] and state["netem"] in (True, False)
    user, edge = f"{PREFIX}user0", f"{PREFIX}edge0"
    link = next(v for v in state["veths"] if v["link"] == "user-0-edge-0")
    up = shaped_rate(user, edge, link["b"]["addr"], 3_000_000, g.up_mbps)
    down = shaped_rate(edge, user, link["a"]["addr"], 4_000_000, g.down_mbps)
    print(f"4g user->edge {up:.2f} Mbit/s (profile {g.up_mbps}), edge->user {down:.2f} Mbit/s "
          f"(profile {g.down_mbps}), netem {state['netem']}")
    assert within(up, g.up_mbps), f"uplink {up:.2f} Mbit/s, profile {g.up_mbps}"
    assert within(down, g.down_mbps), f"downlink {down:.2f} Mbit/s, profile {g.down_mbps}"
    # the edge reaches the cloud over its own link
    cloud_link = next(v for v in state["veths"] if v["link"] == "edge-0-cloud")
    assert topology.measure_rate(edge, f"{PREFIX}cloud", cloud_link["b"]["addr"], 1_000_000) > 5 * g.down_mbps
    assert topology.main(["down", "--workdir", str(workdir)]) == 0
    assert ours() == []
    assert not (workdir / topology.STATE_FILE).exists()


@needs_netns
def test_down_is_idempotent_and_cleans_a_half_built_up(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert topology.main(["down", "--workdir", str(workdir)]) == 0  # nothing there: fine
    real = network.shaping_commands

    def broken(*args, **kwargs):  # fail once the namespaces and the first veths exist
        return [cmd + ["no-such-tc-option"] for cmd in real(*args, **kwargs)]

    monkeypatch.setattr(network, "shaping_commands", broken)  # where build_network looks it up
    plan = topology.make_plan(2, 1, "4g", "fiber", prefix=PREFIX, subnet=SUBNET)
    with pytest.raises(topology.TopologyError, match="no-such-tc-option"):
        topology.up(plan, workdir, tiers=False)
    assert ours() == [], "up undoes what it made when it fails"
    # a crash half-way (state written, nothing undone) is cleaned by down, twice over
    monkeypatch.setattr(lifecycle, "down", lambda *a, **k: [])  # where up looks it up
    with pytest.raises(topology.TopologyError):
        topology.up(plan, workdir, tiers=False)
    monkeypatch.undo()
    assert sorted(ours()) == sorted(plan.namespaces.values())
    assert topology.main(["down", "--workdir", str(workdir)]) == 0
    assert ours() == []
    assert topology.main(["down", "--workdir", str(workdir)]) == 0
    assert ours() == []


@needs_netns
def test_entrypoint_script_shapes_eth0(workdir: Path) -> None:
    """compose/shape-and-run.sh, really run in a namespace whose veth is called eth0."""
    g = get_profile("4g")
    box, peer = f"{PREFIX}box", f"{PREFIX}peer"
    state = topology.State(workdir.resolve())
    state.data["namespaces"] += [box, peer]  # so the fixture's down removes them
    state.save()
    for cmd in (["ip", "netns", "add", box], ["ip", "netns", "add", peer],
                ["ip", "link", "add", "eth0", "netns", box, "type", "veth", "peer", "name", "eth0", "netns", peer],
                ["ip", "-n", box, "addr", "add", f"{SUBNET}.250.1/30", "dev", "eth0"],
                ["ip", "-n", peer, "addr", "add", f"{SUBNET}.250.2/30", "dev", "eth0"],
                ["ip", "-n", box, "link", "set", "eth0", "up"], ["ip", "-n", peer, "link", "set", "eth0", "up"]):
        topology.run(cmd)
    env = {**os.environ, "LINK_PROFILE": "4g", "PYTHON": sys.executable, "RUN_AS": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["ip", "netns", "exec", box, "sh", str(ROOT / "compose" / "shape-and-run.sh"), "--help"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: splitllm" in out.stdout  # it went on to run the CLI
    up = shaped_rate(box, peer, f"{SUBNET}.250.2", 3_000_000, g.up_mbps)
    print(f"entrypoint 4g egress {up:.2f} Mbit/s; {out.stderr.strip()}")
    assert within(up, g.up_mbps), f"egress {up:.2f} Mbit/s, profile {g.up_mbps}"
    if "no ifb device" not in out.stderr:
        down = shaped_rate(peer, box, f"{SUBNET}.250.1", 4_000_000, g.down_mbps)
        print(f"entrypoint 4g ingress {down:.2f} Mbit/s")
        assert within(down, g.down_mbps), f"ingress {down:.2f} Mbit/s, profile {g.down_mbps}"


def test_cli_module_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "shared.lab.topology", "up", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--no-tiers" in out.stdout
    if shutil.which("ip") is None or os.geteuid() != 0:
        out = subprocess.run([sys.executable, "-m", "shared.lab.topology", "down"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "error" in out.stderr
