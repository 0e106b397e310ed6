"""Running a tier as a service: flags generated from its settings model, then uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from shared.config.settings import ServiceSettings, load_settings


def settings_parser(prog: str, cls: type[ServiceSettings]) -> argparse.ArgumentParser:
    """One ``--flag`` per settings field (``data_dir`` -> ``--data-dir``); unset flags fall back to env/file/defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=f"{cls.__doc__ or ''} Every flag also reads "
                                     f"SPLITLLM_<NAME> from the environment.")
    parser.add_argument("--config", default=None, help="a .json, .toml or .yaml file of settings")
    for name, field in cls.model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()
        flag = f"--{name.replace('_', '-')}"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_const", const=True, default=None,
                                help=field.description or "")
            continue
        shown = "none" if "token" in name else default
        parser.add_argument(flag, dest=name, default=None, help=f"{field.description or ''} (default: {shown})".strip())
    return parser


def parse_settings(prog: str, cls: type[ServiceSettings], argv: list[str] | None) -> ServiceSettings:
    args = vars(settings_parser(prog, cls).parse_args(argv))
    config = args.pop("config")
    flags: dict[str, Any] = {}
    for name, value in args.items():
        if value is None:
            continue
        annotation = str(cls.model_fields[name].annotation)
        flags[name] = [v for v in value.split(",") if v] if annotation.startswith("list") else value
    return load_settings(cls, flags, config)


def serve(prog: str, cls: type[ServiceSettings], create_app: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """Parse settings, build the app, run uvicorn until SIGINT/SIGTERM; bad settings exit 2 with one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Idle OpenMP threads sleep instead of spinning: a tier mostly waits for its peers, and several
    # tiers may share cores (read before torch loads, so set here).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pydantic import ValidationError

    try:
        settings = parse_settings(prog, cls, argv)
        settings.check_security()
    except (ValidationError, ValueError, OSError) as exc:
        print(f"{prog}: error: {str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else _first(exc)}",
              file=sys.stderr)
        return 2
    import uvicorn

    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.insecure_dev:
        print(f"\n{'!' * 78}\n{prog}: INSECURE DEVELOPMENT MODE: calls are accepted WITHOUT tokens.\n"
              f"Never expose this service beyond a development machine.\n{'!' * 78}\n", file=sys.stderr, flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=5, ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
    return 0


def _first(exc: Any) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
