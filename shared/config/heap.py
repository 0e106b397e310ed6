"""Whether a process of this project keeps the memory a step frees for the next step (glibc's malloc), set at start.

A training step allocates and frees the same tensors every time: activations, attention's, the gradients. glibc
hands an allocation above its mmap threshold (128 kB, rising with what is freed to at most 32 MiB) to the kernel
and gives it back on free; every thread other than the main one allocates from heaps of its own (64 MB each), which
glibc deletes or shrinks as soon as they fall empty; and the main heap's free top goes back to the kernel above a
trim threshold (twice the mmap threshold). The next step then faults those pages in again, each zero-filled by the
kernel (``splitllm bench http`` records the faults). On a VM whose host takes freed pages back, that costs a large
part of a step (``docs/performance-log.md``).

``reuse_freed_memory`` makes the process keep what it frees, where told to (``mallopt``): allocations up to 32 MiB
come from the heap (``M_MMAP_THRESHOLD``, fixed there), free memory at the heap's top is kept up to 2 GiB
(``M_TRIM_THRESHOLD``), and every thread allocates from the main heap (``M_ARENA_MAX`` 1), which can grow past 64
MB. After the first steps a step reuses the pages it used before. A larger allocation is still mapped and unmapped
as glibc does by default: in the heap such blocks had cost the cloud 40 % more memory (its 201 MB logits, before
they were made in chunks: torch asks for 64-byte alignment, which glibc 2.36 serves from a larger block, so a freed
block could not always take the next tensor of its size and the heap grew instead). The cost that is left: a
process holds about its peak between steps instead of falling back (both sides measured: ``docs/performance-log.md``).
It is not the default: on this project's 2-core VM the faults it saves did not give steps that were faster beyond
the noise of one run to the next. The services' setting ``heap`` (``--heap``, ``SPLITLLM_HEAP``; ``splitllm``'s
other commands read ``SPLITLLM_HEAP``) is ``system``, malloc as glibc sets it, unless set to ``reuse``. A malloc
setting of the environment's own (``GLIBC_TUNABLES`` naming a ``glibc.malloc`` tunable, or a ``MALLOC_*_``
variable), which glibc has applied already, is left alone; so is any C library but glibc.
"""

from __future__ import annotations

import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
KEEP_BYTES = 2**31 - 1  # the most mallopt takes (an int): the free top of the heap kept
HEAP_BELOW = 32 << 20  # allocations up to this come from the heap; larger ones are mapped, and unmapped when freed
HEAP_MODES = ("reuse", "system")  # SPLITLLM_HEAP; "environment" is recorded where the environment set malloc itself
_MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                     "MALLOC_TRIM_THRESHOLD_")

_policy = "system"


def reuse_freed_memory(mode: str | None = None) -> str:
    """Keep freed memory in this process for reuse (see the module's doc) where ``mode`` (default: the environment's
    ``SPLITLLM_HEAP``, else "system") is "reuse"; returns the policy now in force: "reuse", "system" (as told, or
    not glibc) or "environment". Once "reuse", it stays so for the process's life."""
    global _policy
    mode = mode or os.environ.get("SPLITLLM_HEAP") or "system"
    if mode not in HEAP_MODES:
        raise ValueError(f"SPLITLLM_HEAP must be one of {', '.join(HEAP_MODES)}, got {mode!r}")
    if _policy == "reuse":
        return _policy
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(v in os.environ for v in _MALLOC_VARIABLES):
        _policy = "environment"
    elif mode == "reuse" and on_glibc():
        import ctypes  # only here: every splitllm process imports this module at start

        mallopt = ctypes.CDLL(None).mallopt
        settings = ((M_MMAP_THRESHOLD, HEAP_BELOW), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_ARENA_MAX, 1))
        results = [mallopt(option, value) for option, value in settings]  # each one set, whatever the others gave
        _policy = "reuse" if results == [1, 1, 1] else "system"
    return _policy


def on_glibc() -> bool:
    """Whether this process runs on glibc, whose malloc ``reuse_freed_memory`` sets."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or a C library that does not name itself
        return False


def heap_policy() -> str:
    """The policy ``reuse_freed_memory`` put in force in this process ("system" before it ran), for the benches' JSON."""
    return _policy
