"""Codec specs (CodecSpec): the text naming a codec and its params, parsed, validated and printed.

``CodecSpec.parse("NAME[:KEY=VALUE[,KEY=VALUE...]][+POST]")``: ``fp32`` (lossless: the lz4 path),
``raw``, ``lz4``, ``fp16``, ``bf16``, ``int8:block=64,channels=rms``, ``int4:block=64,channels=rms``,
``topk:k=100`` / ``topk:ratio=0.01`` (+ ``values=fp16|fp32``), POST = ``shuffle-lz4`` (lossy only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from shared.protocol.codecs.blockwise import CHANNEL_MODES, DEFAULT_BLOCK, DEFAULT_CHANNELS, check_block
from shared.protocol.codecs.entries import POSTS
from shared.protocol.codecs.topk import SPEC_VALUES

# spec name -> {param: type}
_SPEC_PARAMS: dict[str, dict[str, type]] = {
    "fp32": {},
    "fp16": {},
    "bf16": {},
    "int8": {"block": int, "channels": str},
    "int4": {"block": int, "channels": str},
    "topk": {"k": int, "ratio": float, "values": str},
    "raw": {},
    "lz4": {},
}
KNOWN_CODECS: tuple[str, ...] = tuple(_SPEC_PARAMS)
_LOSSLESS_WIRE = {"fp32": "lz4", "lz4": "lz4", "raw": "raw"}


def _known() -> str:
    return f"known codecs: {', '.join(KNOWN_CODECS)}"


@dataclass(frozen=True, eq=True)
class CodecSpec:
    """A parsed codec spec: ``name``, ``params`` (read-only mapping, only what was given) and ``post``.

    ``str(spec)`` is canonical (params sorted) and ``CodecSpec.parse(str(spec)) == spec``.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    post: str | None = None

    def __post_init__(self) -> None:
        if self.name not in _SPEC_PARAMS:
            raise ValueError(f"unknown codec {self.name!r} ({_known()})")
        allowed = _SPEC_PARAMS[self.name]
        if self.params is None:
            object.__setattr__(self, "params", {})
        if not isinstance(self.params, Mapping):
            raise ValueError(f"codec {self.name!r}: params must be a mapping")
        clean: dict[str, Any] = {}
        for key, value in self.params.items():
            if key not in allowed:
                takes = ", ".join(allowed) or "no params"
                raise ValueError(f"codec {self.name!r} has no param {key!r} (it takes: {takes}; {_known()})")
            clean[key] = _check_param(self.name, key, value)
        if self.name == "topk" and ("k" in clean) == ("ratio" in clean):
            raise ValueError("codec 'topk' needs exactly one of k=<int> or ratio=<float>, e.g. 'topk:ratio=0.01'")
        if self.post is not None:
            if self.post not in POSTS:
                raise ValueError(f"unknown post-processing {self.post!r} (known: {', '.join(POSTS)})")
            if not self.lossy:
                raise ValueError(f"codec {self.name!r} is lossless; '+{self.post}' applies to fp16, bf16, int8, int4, topk")
        object.__setattr__(self, "params", MappingProxyType(dict(sorted(clean.items()))))

    # -- parsing / printing

    @classmethod
    def parse(cls, text: str | CodecSpec) -> CodecSpec:
        """Parse ``NAME[:KEY=VALUE[,KEY=VALUE...]][+POST]``; ValueError (listing known codecs) if bad."""
        if isinstance(text, CodecSpec):
            return text
        if not isinstance(text, str):
            raise ValueError(f"codec spec must be a str, got {type(text).__name__} ({_known()})")
        head, plus, post = text.strip().partition("+")
        if plus and not post.strip():
            raise ValueError(f"codec spec {text!r}: empty post-processing after '+'")
        name, colon, rest = head.partition(":")
        name = name.strip()
        if name not in _SPEC_PARAMS:
            raise ValueError(f"unknown codec {name!r} ({_known()})")
        params: dict[str, Any] = {}
        if colon:
            if not rest.strip():
                raise ValueError(f"codec spec {text!r}: empty params after ':'")
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key, value = key.strip(), value.strip()
                if not eq or not key or not value:
                    raise ValueError(f"codec spec {text!r}: params must be key=value, got {item.strip()!r}")
                if key in params:
                    raise ValueError(f"codec spec {text!r}: param {key!r} given twice")
                allowed = _SPEC_PARAMS[name]
                if key not in allowed:
                    takes = ", ".join(allowed) or "no params"
                    raise ValueError(f"codec {name!r} has no param {key!r} (it takes: {takes}; {_known()})")
                params[key] = _parse_value(name, key, value, allowed[key])
        return cls(name, params, post.strip() if plus else None)

    def __str__(self) -> str:
        s = self.name
        if self.params:
            s += ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        if self.post:
            s += "+" + self.post
        return s

    def __repr__(self) -> str:
        return f"CodecSpec({str(self)!r})"

    def __hash__(self) -> int:
        return hash(str(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodecSpec) and str(self) == str(other)

    # -- what the wire encoder needs

    @property
    def lossy(self) -> bool:
        """True for codecs that only apply to floating tensors (everything but fp32/raw/lz4)."""
        return self.name not in _LOSSLESS_WIRE

    @property
    def wire_codec(self) -> str:
        """The registered wire codec this spec encodes with ("fp32" -> "lz4")."""
        return _LOSSLESS_WIRE.get(self.name, self.name)

    def wire_params(self) -> dict[str, Any]:
        """Keyword arguments for the wire codec's encode function."""
        if not self.lossy:
            return {}
        out: dict[str, Any] = {}
        if self.name in ("int8", "int4"):
            out["block"] = self.params.get("block", DEFAULT_BLOCK)
            channels = self.params.get("channels", DEFAULT_CHANNELS)
            if channels != "none":
                out["channels"] = channels
        elif self.name == "topk":
            out.update({k: v for k, v in self.params.items() if k in ("k", "ratio")})
            out["values"] = SPEC_VALUES[self.params.get("values", "fp32")]
        if self.post:
            out["post"] = self.post
        return out


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _parse_value(name: str, key: str, value: str, typ: type) -> Any:
    try:
        if typ is int:
            return int(value, 10)
        if typ is float:
            return float(value)
    except ValueError:
        raise ValueError(f"codec {name!r}: param {key}={value!r} is not a valid {typ.__name__}") from None
    return value


def _check_param(name: str, key: str, value: Any) -> Any:
    if key == "block":
        return check_block(value, f"codec {name!r}")
    if key == "k":
        if type(value) is not int or value < 1:
            raise ValueError(f"codec {name!r}: k must be an int >= 1, got {value!r}")
        return value
    if key == "ratio":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"codec {name!r}: ratio must be a number, got {type(value).__name__}")
        value = float(value)
        if not 0 < value <= 1:
            raise ValueError(f"codec {name!r}: ratio must be in (0, 1], got {value!r}")
        return value
    if key == "channels":
        if value not in (*CHANNEL_MODES, "none"):
            raise ValueError(f"codec {name!r}: channels must be one of {', '.join(CHANNEL_MODES)}, none; got {value!r}")
        return value
    if key == "values":
        if value not in SPEC_VALUES:
            raise ValueError(f"codec {name!r}: values must be one of {', '.join(SPEC_VALUES)}, got {value!r}")
        return value
    raise AssertionError(key)  # pragma: no cover - _SPEC_PARAMS and this function agree
