"""Real shaped links on one Linux host: one network namespace per tier, veth pairs between them.

``splitllm topology up --profile 4g [--users 4 --edges 2 --edge-profile fiber --workdir runs/topology
[cloud flags: --model ... --data ...]]`` builds, as root::

    root ns --(sl-host, unshaped)-- sl-cloud --(edge profile)-- sl-edge<e> --(user profile)-- sl-user<i>

with user i behind edge i % E, one /30 per link (10.77.0.0/30 host<->cloud, 10.77.1.4e/30
edge e<->cloud, 10.77.(2 + i // 64).4(i % 64)/30 user i<->its edge). Each end's egress is shaped
with ``tc tbf``: the user's towards its edge at the profile's uplink rate, the edge's towards the user
at its downlink rate, and likewise edge<->cloud with the edge profile. Where the kernel has ``netem``
(probed once in a scratch namespace) the profile's delay, jitter and loss go in a netem qdisc above
the tbf; where it does not, tbf paces the bytes and the edges' and users' link emulators
(``shared.protocol.links.LinkEmulator``, ``--link-rate-shaped``) add the delay, jitter and loss. The tiers then start inside their
namespaces (``ip netns exec <ns> python -m shared.lab.cli <tier> ...``), and ``up`` waits until every
user has registered, writes ``<workdir>/state.json`` (namespaces, veths, pids, urls) and prints the
cloud's URL, which the host reaches over the unshaped ``sl-host`` link. Flags ``up`` does not know are
the tiers' settings: cloud-only ones go to the cloud, ones every tier has to every tier. Without
``--insecure-dev``, each tier gets a credential of its own from a fresh deployment key in
``<workdir>/credentials`` (the admin's bearer credential in ``admin.token`` there, mode 0600).

``splitllm topology down [--workdir ...]`` stops those processes and deletes the namespaces (their
veths go with them). It is idempotent and also cleans up after an ``up`` that failed half-way: the
state file is written before each thing is created.

``measure_rate`` times a plain TCP transfer between two namespaces (used by the tests).

The modules: ``plan`` (names, addresses, rates; pure), ``network`` (ip/tc, namespaces, shaping, the state
file), ``tiers`` (the tier processes), ``lifecycle`` (``up`` and ``down``), ``rate`` (``measure_rate``) and
``cli`` (the command line, also ``python -m shared.lab.topology``).
"""

from shared.lab.topology.cli import build_parser, main
from shared.lab.topology.lifecycle import down, up
from shared.lab.topology.network import (STATE_FILE, State, build_network, in_ns, list_namespaces, netem_supported,
                                         requirements_problem, run, shaping_commands)
from shared.lab.topology.plan import (MAX_EDGES, MAX_USERS, PORTS, End, Link, Plan, TopologyError, link_of, make_plan,
                                      parent_addr)
from shared.lab.topology.rate import measure_rate
from shared.lab.topology.tiers import (ROOT, TOPOLOGY_OWNED, TierArgs, parsed_config, split_tier_args, start_tiers,
                                       tier_commands, tier_env, wait_ready)

__all__ = [
    "MAX_EDGES", "MAX_USERS", "PORTS", "ROOT", "STATE_FILE", "TOPOLOGY_OWNED",
    "End", "Link", "Plan", "State", "TierArgs", "TopologyError",
    "build_network", "build_parser", "down", "in_ns", "link_of", "list_namespaces", "main", "make_plan",
    "measure_rate", "netem_supported", "parent_addr", "parsed_config", "requirements_problem", "run",
    "shaping_commands", "split_tier_args", "start_tiers", "tier_commands", "tier_env", "up", "wait_ready",
]
