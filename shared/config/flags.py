"""Command-line flags generated from a pydantic model's fields: one declaration, its help and its checks."""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from pydantic import BaseModel

from shared.errors import InvalidInput


def flag_name(name: str, info: Any) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return "--" + str(extra.get("flag") or name.replace("_", "-"))


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int, ``list[str] | None`` -> list, ``dict[str, Any]`` -> dict."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return typing.get_origin(annotation) or annotation


def _default(info: Any) -> Any:
    return info.default_factory() if info.default_factory is not None else info.default


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], names: typing.Iterable[str] | None = None,
                    secret: typing.Callable[[str], bool] = lambda name: False) -> None:
    """One ``--flag`` per field (``data_dir`` -> ``--data-dir``); an unset flag stays None (the model's default applies).

    Booleans that default to False are switches (``--insecure-dev``); those that default to True get
    ``--no-<name>`` too. Lists take comma-separated values (or a JSON list); maps take a JSON object.
    """
    for name in names if names is not None else model.model_fields:
        info = model.model_fields[name]
        flag, kind, default = flag_name(name, info), _base_type(info.annotation), _default(info)
        help_text = info.description or ""
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_const"
            kw = {"const": True} if action == "store_const" else {}
            parser.add_argument(flag, dest=name, action=action, default=None, help=help_text, **kw)
            continue
        shown = "none" if secret(name) else ("none" if default is None else json.dumps(default) if kind in (dict, list) else default)
        if "(default" not in help_text:
            help_text = f"{help_text} (default: {shown})".strip()
        parser.add_argument(flag, dest=name, default=None, help=help_text)


def model_flag_values(args: argparse.Namespace, model: type[BaseModel], names: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """The flags the user set, as values the model validates (lists split on commas, maps parsed as JSON)."""
    out: dict[str, Any] = {}
    for name in names if names is not None else model.model_fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        info = model.model_fields[name]
        kind = _base_type(info.annotation)
        if kind is list and isinstance(value, str) and value.lstrip().startswith("["):
            value = _json(value, flag_name(name, info), "a JSON list")
        elif kind is list and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elif kind is dict and isinstance(value, str):
            value = _json(value, flag_name(name, info), "a JSON object")
            if not isinstance(value, dict):
                raise InvalidInput(f"{flag_name(name, info)} must be a JSON object, e.g. '{{\"k\": 1}}'")
        out[name] = value
    return out


def _json(text: str, flag: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{flag} must be {what} ({exc.msg} at position {exc.pos}), e.g. '{{\"k\": 1}}'") from None


def first_error(exc: Any) -> str:
    """One line from a pydantic ValidationError: the field and what is wrong with it."""
    err = exc.errors()[0]
    return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
