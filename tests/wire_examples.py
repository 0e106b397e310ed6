"""The README's wire examples as a client in another language would build them: plain msgpack, values packed by hand."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import msgpack

README = Path(__file__).resolve().parents[1] / "README.md"
FORMATS = {"float32": "f", "float16": "e", "float64": "d", "int64": "q", "int32": "i", "int16": "h", "int8": "b",
           "uint8": "B", "bool": "?"}


def examples() -> dict[str, dict]:
    text = README.read_text()
    found = re.findall(r"<!-- wire-example: ([a-z-]+) -->\s*```json\n(.*?)```", text, re.S)
    return {name: json.loads(body) for name, body in found}


def codec_examples() -> dict[str, dict]:
    text = README.read_text()
    found = re.findall(r"<!-- codec-example: ([a-z0-9-]+) -->\s*```json\n(.*?)```", text, re.DOTALL)
    return {name: json.loads(body) for name, body in found}


BIN_FIELDS = ("data", "scales", "channel_scales", "indices")


def entry_of(example: dict) -> dict:
    """A codec example's tensor entry as it goes on the wire: its hex byte strings as bytes."""
    return {k: bytes.fromhex(v) if k in BIN_FIELDS else v for k, v in example["entry"].items()}


def values_of(example: dict, key: str = "values") -> list[float]:
    """``values`` (or ``decoded``) of a codec example: a list, or ``"N x V"`` for N elements of V."""
    values = example[key]
    if isinstance(values, str):
        count, _, value = values.partition(" x ")
        return [float(value)] * int(count)
    return values


def client_bytes(example: dict) -> bytes:
    """What a client writes: the tensors' values packed little-endian into ``data``, the rest as it is."""
    doc = {k: v for k, v in example.items() if k != "tensors"}
    if "tensors" in example:
        doc["tensors"] = {}
        for name, entry in example["tensors"].items():
            raw = struct.pack("<" + FORMATS[entry["dtype"]] * len(entry["values"]), *entry["values"])
            doc["tensors"][name] = {"dtype": entry["dtype"], "shape": entry["shape"], "codec": entry["codec"],
                                    "data": raw}
    return msgpack.packb(doc, use_bin_type=True)
