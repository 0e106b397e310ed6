"""Checks of a decoded message's fields: present, known, of the right type (``InvalidInput``, a 422, otherwise)."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import torch

from shared.errors import InvalidInput
from shared.protocol.enums import Mode
from shared.protocol.wire import Message


Json = dict[str, Any]


def lacks(kind: str, missing: list[str]) -> InvalidInput:
    return InvalidInput(f"{kind} message lacks {', '.join(missing)}")


def check_fields(kind: str, meta: Json, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [f"meta.{k}" for k in required if k not in meta]
    if missing:
        raise lacks(kind, missing)
    unknown = sorted(set(meta) - set(required) - set(optional))
    if unknown:
        raise InvalidInput(f"{kind} message has unknown field(s) {', '.join(f'meta.{k}' for k in unknown)[:200]}")


def tensors_of(kind: str, msg: Message, names: tuple[str, ...]) -> list[torch.Tensor]:
    missing = [f"tensors.{n}" for n in names if n not in msg.tensors]
    if missing:
        raise lacks(kind, missing)
    unknown = sorted(set(msg.tensors) - set(names))
    if unknown:
        raise InvalidInput(f"{kind} message has unknown tensor(s) {', '.join(unknown)[:200]}")
    return [msg.tensors[n] for n in names]


def as_int(value: Any, where: str, lo: int | None = None) -> int:
    if type(value) is not int or (lo is not None and value < lo):
        raise InvalidInput(f"{where} must be an integer{f' >= {lo}' if lo is not None else ''} (got {str(value)[:40]!r})")
    return value


def as_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where} must be a non-empty string")
    return value


def as_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{where} must be a finite number (got {str(value)[:40]!r})")
    return float(value)


METRICS_BYTES, METRICS_BYTES_PER_STEP = 4096, 32  # a participant's metrics in a round: its per-step figures fit


def check_metrics_size(metrics: Json, local_steps: int, where: str, relayed: bool = False) -> None:
    """A participant's metrics take at most ``METRICS_BYTES`` plus ``METRICS_BYTES_PER_STEP`` per local step as
    msgpack (its per-step losses and times fit; ``relayed``: with its edge's own figures, up to 256 bytes more): the
    cloud keeps them in the round's record and serves them with every read of the round history."""
    limit = METRICS_BYTES + METRICS_BYTES_PER_STEP * local_steps + (256 if relayed else 0)
    size = len(msgpack.packb(metrics, use_bin_type=True))
    if size > limit:
        raise InvalidInput(f"{where} take {size} bytes; a round of {local_steps} local steps allows {limit}")


def optional_number(meta: Json, key: str) -> float | None:
    return None if meta.get(key) is None else as_number(meta[key], f"meta.{key}")


def as_mode(value: Any, where: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise InvalidInput(f"{where} must be one of {', '.join(m.value for m in Mode)} (got {str(value)[:40]!r})") from None


def as_map(value: Any, where: str) -> Json:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a map")
    return value


MAX_MICRO_BATCHES = 4096  # a step's micro-batches: at most the largest batch


def as_micro(value: Any, where: str) -> tuple[int, int]:
    """``[index, count]`` of a micro-batch within its step: 0 <= index < count <= ``MAX_MICRO_BATCHES``."""
    if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
            and 0 <= value[0] < value[1] <= MAX_MICRO_BATCHES):
        raise InvalidInput(f"{where} must be [index, count] with 0 <= index < count <= {MAX_MICRO_BATCHES} "
                           f"(got {str(value)[:40]!r})")
    return value[0], value[1]
