"""A tier's blocks as copies that share every frozen tensor, so that several sessions' forwards run at once.

A forward binds its session's adapters (and a plug-in's base weight overrides) onto the modules it runs, so two
sessions cannot run one set of modules at once. ``BlockCopies`` holds ``count`` sets: the partition as loaded (the
first copy) and ``count - 1`` copies of its module tree made with ``copy.deepcopy``, told to keep every parameter
and buffer, the model's config and the token embedding (a device's: it runs one session) as they are. A copy costs
its modules' Python objects; every weight is the first copy's tensor, so no weight is held twice (the tests check
it). A forward takes a free copy (the one given back last: its caches are warm), binds, runs, gives it back; with
every copy taken, it waits for one. With one copy (the default in process) that is a lock around binding and
forward, as a tier had before there were copies.

How many: the services' ``block_copies``, 1 by default; 0 asks for as many forwards as the cores run beside each other
at the tier's torch threads (``auto_copies``: cores / threads on a CPU, 1 on a GPU, where one process's kernels queue
on one stream anyway). More than one pays where a tier has its cores to itself; where several tiers' processes share
the cores (``bench scaling`` runs them all on one machine), the cores are busy already and a second copy measured
no faster, and slower in most runs (``docs/performance-log.md``, "Copies of the blocks").
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.model.adapters import AdapterSlots
from shared.model.partition import Partition


@dataclass
class BlockCopy:
    """One set of modules: the blocks' partition, each task's head partition (``None`` on a tier without the head;
    the first task's is the partition itself) and each task's adapter slots on them, in the tier's task order."""

    partition: Partition
    heads: list[Partition | None]
    slots: list[AdapterSlots]


def auto_copies(device: str, threads: int) -> int:
    """The services' ``block_copies`` of 0: the cores over the torch threads each forward uses (torch's default
    where ``threads`` is 0) on a CPU, at least 1; 1 on any other device."""
    if torch.device(device).type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (threads or torch.get_num_threads()))


def copy_of(first: BlockCopy) -> BlockCopy:
    """A copy of ``first``'s modules that shares its parameters, buffers, config and token embedding."""
    part = first.partition
    kept: list[Any] = [part.config, part.family]
    if part.embed is not None:
        kept.append(part.embed)
    for module in (part, *(h for h in first.heads if h is not None)):
        kept.extend(itertools.chain(module.parameters(), module.buffers()))
    memo = {id(obj): obj for obj in kept}
    partition, heads = copy.deepcopy((part, first.heads), memo)
    return BlockCopy(partition, heads, [AdapterSlots(partition, head) for head in heads])


class BlockCopies:
    """The copies a tier's forwards take turns on (see the module's doc); ``held_s`` adds up the seconds copies were
    taken, the share of the steps that cannot run beside another session's when there is one copy."""

    def __init__(self, count: int = 1) -> None:
        if count < 1:
            raise ValueError(f"a tier needs at least 1 copy of its blocks, got {count}")
        self.wanted = count
        self._cond = threading.Condition(threading.RLock())
        self._mine = threading.local()
        self._all: list[BlockCopy] = []
        self._free: list[BlockCopy] = []
        self.held_s = 0.0

    @property
    def count(self) -> int:
        return len(self._all)

    def idle(self) -> int:
        """How many copies no forward holds now."""
        with self._cond:
            return len(self._free)

    def reset(self, first: BlockCopy) -> None:
        """Copies of ``first`` (loaded now): ``wanted`` in all. Call it before any forward, or under ``quiet``."""
        with self._cond:
            self._all = [first, *(copy_of(first) for _ in range(self.wanted - 1))]
            self._free = list(reversed(self._all))
            self._cond.notify_all()

    @contextmanager
    def take(self) -> Iterator[BlockCopy]:
        """A copy for this thread alone until the block ends (the one it holds already, where it does)."""
        mine = getattr(self._mine, "copy", None)
        if mine is not None:
            yield mine
            return
        with self._cond:
            while not self._free:
                self._cond.wait()
            taken = self._free.pop()
        self._mine.copy, started = taken, time.perf_counter()
        try:
            yield taken
        finally:
            self._mine.copy = None
            with self._cond:
                self.held_s += time.perf_counter() - started
                self._free.append(taken)
                self._cond.notify()

    @contextmanager
    def quiet(self) -> Iterator[Sequence[BlockCopy]]:
        """Every copy free and none taken until the block ends (to reload the blocks); yields them."""
        with self._cond:
            while len(self._free) < len(self._all):
                self._cond.wait()
            yield list(self._all)


def swap_weight(partition: Partition, name: str, value: torch.Tensor) -> torch.Tensor:
    """Set the parameter ``name`` of ``partition``'s modules to ``value`` (a frozen parameter unless it is one);
    returns the one it replaced."""
    module_name, _, pname = name.rpartition(".")
    module = partition.get_submodule(module_name)
    old = getattr(module, pname)
    setattr(module, pname, value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False))
    return old
