"""Key namespaces of a federation's global adapters: ``<deployment>/`` and a task head's ``<data>/`` prefixes.

A key's namespace is everything up to its last ``/`` (``""`` for a federation of one deployment of one
task); adapter keys themselves never contain one. Updates are combined namespace by namespace, so
the users of one model average its blocks, and the users of one task its head.
"""

from __future__ import annotations

from shared.model.adapters import AdapterState


def namespace_of(key: str) -> str:
    return key[: key.rfind("/") + 1]


def with_prefix(state: AdapterState, prefix: str) -> AdapterState:
    return {prefix + k: v for k, v in state.items()} if prefix else dict(state)


def within(state: AdapterState, prefix: str) -> AdapterState:
    """The keys under ``prefix``, without it (every key for ``""``)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else dict(state)


def namespaces(*states: AdapterState) -> list[str]:
    return sorted({namespace_of(k) for state in states for k in state})
