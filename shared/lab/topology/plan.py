"""The topology's pure plan: namespaces, links, addresses and rates from the link profiles (nothing run)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.protocol.links import LinkProfile, get_profile

PORTS = {"cloud": 8000, "edge": 8100, "user": 8200}
MAX_EDGES = 64
MAX_USERS = 64 * 200


class TopologyError(RuntimeError):
    """A step of building or tearing down the topology failed; reported in one line."""


# ---------------------------------------------------------------------------------------------
# the plan: namespaces, links, addresses, rates


@dataclass
class End:
    ns: str | None  # None: the root namespace
    dev: str
    addr: str  # without the /30
    egress_mbps: float | None  # None: unshaped


@dataclass
class Link:
    name: str
    profile: str
    a: End
    b: End


@dataclass
class Plan:
    prefix: str
    users: int
    edges: int
    profile: str
    edge_profile: str
    subnet: str
    namespaces: dict[str, str] = field(default_factory=dict)  # tier name -> namespace
    addrs: dict[str, str] = field(default_factory=dict)  # tier name -> the address its parent calls back on
    links: list[Link] = field(default_factory=list)


def _rate(profile: LinkProfile | None, upward: bool) -> float | None:
    if profile is None:
        return None
    return profile.up_mbps if upward else profile.down_mbps


def make_plan(users: int, edges: int, profile: str, edge_profile: str, prefix: str = "sl-",
              subnet: str = "10.77") -> Plan:
    if not 1 <= edges <= MAX_EDGES:
        raise TopologyError(f"--edges must be in 1..{MAX_EDGES}")
    if not 1 <= users <= MAX_USERS:
        raise TopologyError(f"--users must be in 1..{MAX_USERS}")
    octets = subnet.split(".")
    if len(octets) != 2 or not all(o.isdigit() and 0 <= int(o) <= 255 for o in octets):
        raise TopologyError(f"--subnet takes the first two octets, e.g. 10.77 (got '{subnet}')")
    if len(f"{prefix}host") > 15:
        raise TopologyError(f"--prefix '{prefix}' is too long (interface names are at most 15 characters)")
    user_p, edge_p = get_profile(profile), get_profile(edge_profile)  # ValueError on unknown names
    plan = Plan(prefix, users, edges, profile, edge_profile, subnet)
    plan.namespaces["cloud"] = f"{prefix}cloud"
    for e in range(edges):
        plan.namespaces[f"edge-{e}"] = f"{prefix}edge{e}"
    for i in range(users):
        plan.namespaces[f"user-{i}"] = f"{prefix}user{i}"
    ns = plan.namespaces
    # the host reaches the cloud over an unshaped link
    plan.links.append(Link("host-cloud", "none", End(None, f"{prefix}host", f"{subnet}.0.1", None),
                           End(ns["cloud"], "host", f"{subnet}.0.2", None)))
    plan.addrs["host"], plan.addrs["cloud"] = f"{subnet}.0.1", f"{subnet}.0.2"
    for e in range(edges):
        base = 4 * e
        edge_end = End(ns[f"edge-{e}"], "cloud", f"{subnet}.1.{base + 2}", _rate(edge_p, upward=True))
        cloud_end = End(ns["cloud"], f"edge{e}", f"{subnet}.1.{base + 1}", _rate(edge_p, upward=False))
        plan.links.append(Link(f"edge-{e}-cloud", edge_profile, edge_end, cloud_end))
        plan.addrs[f"edge-{e}"] = edge_end.addr
    for i in range(users):
        e = i % edges
        third, base = 2 + i // 64, 4 * (i % 64)
        user_end = End(ns[f"user-{i}"], "edge", f"{subnet}.{third}.{base + 2}", _rate(user_p, upward=True))
        edge_end = End(ns[f"edge-{e}"], f"user{i}", f"{subnet}.{third}.{base + 1}", _rate(user_p, upward=False))
        plan.links.append(Link(f"user-{i}-edge-{e}", profile, user_end, edge_end))
        plan.addrs[f"user-{i}"] = user_end.addr
    return plan


def link_of(plan: Plan, name: str) -> Link:
    return next(link for link in plan.links if link.name == name)


def parent_addr(plan: Plan, tier: str) -> str:
    """The address on ``tier``'s uplink at which it reaches its parent (edge for a user, cloud for an edge)."""
    if tier.startswith("user-"):
        i = int(tier.split("-")[1])
        return link_of(plan, f"{tier}-edge-{i % plan.edges}").b.addr
    if tier.startswith("edge-"):
        return link_of(plan, f"{tier}-cloud").b.addr
    raise ValueError(tier)
