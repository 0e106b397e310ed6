"""``measure_rate``: times a plain TCP transfer between two namespaces, or two containers (used by the tests)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from shared.lab.topology.network import in_ns, run
from shared.lab.topology.plan import TopologyError

_RECEIVER = r"""
import socket, sys, time
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 0)); srv.listen(1); srv.settimeout(float(sys.argv[2]))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.settimeout(float(sys.argv[2]))
n = first = 0; t0 = t1 = None
while True:
    b = conn.recv(1 << 16)
    if not b:
        break
    t1 = time.perf_counter()
    if t0 is None:
        t0, first = t1, len(b)
    n += len(b)
conn.sendall(f"{n} {first} {(t1 - t0) if t0 is not None else 0.0}\n".encode())
conn.close()
"""

_SENDER = r"""
import socket, sys
addr, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((addr, port), timeout=timeout)
chunk = b"\0" * (1 << 16); left = nbytes
while left > 0:
    s.sendall(chunk[:min(left, len(chunk))]); left -= min(left, len(chunk))
s.shutdown(socket.SHUT_WR)
print(s.makefile().readline().strip(), flush=True)
"""


def measure_rate(src_ns: str, dst_ns: str, dst_addr: str, nbytes: int, timeout: float = 60.0,
                 python: str = sys.executable, wrap: Callable[..., list[str]] = in_ns) -> float:
    """Mbit/s of payload that a TCP connection moves from ``src_ns`` to ``dst_addr`` (in ``dst_ns``),
    timed at the receiver from the first to the last byte (the first read's bytes not counted).
    ``wrap(place, *cmd)`` runs a command in a place: a namespace (default), or e.g. a container."""
    recv = subprocess.Popen(wrap(dst_ns, python, "-c", _RECEIVER, dst_addr, str(timeout)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        line = recv.stdout.readline().strip()
        if not line.isdigit():
            recv.wait(timeout=5)
            raise TopologyError(f"receiver in {dst_ns} did not start: {recv.stderr.read().strip()}")
        sent = run(wrap(src_ns, python, "-c", _SENDER, dst_addr, line, str(nbytes), str(timeout)),
                   timeout=timeout + 5)
        n, first, seconds = sent.stdout.split()
        recv.wait(timeout=10)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    n, first, seconds = int(n), int(first), float(seconds)
    if n != nbytes:
        raise TopologyError(f"sent {nbytes} bytes, the receiver got {n}")
    if seconds <= 0:
        raise TopologyError("transfer too short to time; send more bytes")
    return (n - first) * 8 / seconds / 1e6
