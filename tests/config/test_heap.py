"""A ``splitllm`` process keeps the memory a step frees for the next one where told to (``heap``: ``reuse``).

Each case runs in a fresh interpreter: malloc's settings hold for a process's life.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.config.heap import HEAP_BELOW, on_glibc

# A compute thread (a service's steps run on worker threads) allocates a tensor under the heap's limit and one above
# it: does each come from the process's heap, which keeps what is freed, or from memory of the thread's own (a
# mapping, or a heap of the thread's, both given back when freed and faulted in afresh the next time)?
PROBE = f"""
import json, sys, threading
import torch
from shared.config.heap import reuse_freed_memory, heap_policy
policy = reuse_freed_memory() if sys.argv[1] == "start" else heap_policy()
heap = {{}}
def in_heap(t):
    for line in open("/proc/self/maps"):
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if line.rstrip().endswith("[heap]") and low <= t.data_ptr() < high:
            return True
    return False
def allocate():
    small, large = torch.empty({HEAP_BELOW // 2} // 4), torch.empty({4 * HEAP_BELOW} // 4)
    heap.update(small=in_heap(small), large=in_heap(large))
thread = threading.Thread(target=allocate)
thread.start()
thread.join()
print(json.dumps({{"policy": policy, "from_heap": heap["small"], "large_from_heap": heap["large"]}}))
"""


def probe(env: dict[str, str], start: bool = True) -> dict:
    own = ("SPLITLLM_HEAP", "GLIBC_TUNABLES", "MALLOC_")  # this run's settings, not the caller's
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)} | env
    out = subprocess.run([sys.executable, "-c", PROBE, "start" if start else "no"], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout)


@pytest.mark.skipif(not on_glibc(), reason="glibc's malloc")
def test_a_compute_thread_allocates_from_the_heap_that_keeps_freed_memory_where_told_to() -> None:
    kept, own = {"from_heap": True, "large_from_heap": False}, {"from_heap": False, "large_from_heap": False}
    assert probe({"SPLITLLM_HEAP": "reuse"}) == {"policy": "reuse", **kept}  # above the limit: mapped as before
    assert probe({}, start=False) == {"policy": "system", **own}  # glibc's own
    assert probe({}) == {"policy": "system", **own}  # the default
    assert probe({"SPLITLLM_HEAP": "system"}) == {"policy": "system", **own}
    # the environment's own malloc settings, which glibc applied at start
    assert probe({"SPLITLLM_HEAP": "reuse", "MALLOC_ARENA_MAX": "2"}) == {"policy": "environment", **own}
    tunable = {"SPLITLLM_HEAP": "reuse", "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}
    assert probe(tunable)["policy"] == "environment"
    assert probe({"SPLITLLM_HEAP": "reuse", "GLIBC_TUNABLES": "glibc.rtld.nns=4"})["policy"] == "reuse"  # not malloc's


def test_an_unknown_mode_is_refused_with_one_line() -> None:
    env = os.environ | {"SPLITLLM_HEAP": "mmap"}
    for argv, line in ((["-m", "shared.lab.cli", "sim", "--help"], "SPLITLLM_HEAP must be one of reuse, system, got 'mmap'"),
                       (["-m", "edge_server", "--insecure-dev"], "heap: Input should be 'reuse' or 'system'")):
        out = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 2, out
        assert out.stderr.strip().splitlines()[-1].endswith(line), out.stderr
