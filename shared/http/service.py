"""Running a tier as a service: flags generated from its settings model, then uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from shared.config.flags import add_model_flags, first_error, model_flag_values
from shared.config.heap import reuse_freed_memory
from shared.config.settings import ServiceSettings, load_settings
from shared.config.threads import sleep_idle_threads
from shared.http.client import Identity
from shared.http.credentials import (Credential, CredentialError, Principal, Revocations, Verifier,
                                     load_public_key)


def settings_parser(prog: str, cls: type[ServiceSettings]) -> argparse.ArgumentParser:
    """One ``--flag`` per settings field (``data_dir`` -> ``--data-dir``); unset flags fall back to env/file/defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=f"{cls.__doc__ or ''} Every flag also reads "
                                     f"SPLITLLM_<NAME> from the environment.")
    parser.add_argument("--config", default=None, help="a .json, .toml or .yaml file of settings")
    add_model_flags(parser, cls, secret=lambda name: "token" in name)
    return parser


def parse_settings(prog: str, cls: type[ServiceSettings], argv: list[str] | None) -> ServiceSettings:
    args = settings_parser(prog, cls).parse_args(argv)
    return load_settings(cls, model_flag_values(args, cls), args.config)


@dataclass(frozen=True)
class TierSecurity:
    """A tier's own identity (for its calls) and the verifier of its callers' credentials (None in development)."""

    identity: Identity
    verifier: Verifier | None
    principal: Principal | None  # whom this tier's credential names


def tier_security(settings: ServiceSettings, role: str, revocations: Revocations | None = None) -> TierSecurity:
    """Load this tier's credential and the trust key, and check that they agree with each other and with the settings."""
    verify = settings.ca_file or True
    if settings.insecure_dev:
        return TierSecurity(Identity(token=settings.token_value(), verify=verify), None, None)
    verifier = Verifier(load_public_key(str(settings.trust_key)), settings.deployment, revocations)
    credential = Credential.load(str(settings.credential_value()))
    principal, _ = verifier.certificate(credential.certificate)
    if principal.role != role or credential.key is None:
        raise CredentialError(f"this {role} was given a {principal.role} credential; issue it one with --role {role}")
    return TierSecurity(Identity(credential=credential, verify=verify), verifier, principal)


def serve(prog: str, cls: type[ServiceSettings], create_app: Callable[[Any], Any], argv: list[str] | None = None,
          check: Callable[[Any], Any] | None = None) -> int:
    """Parse settings, build the app, run uvicorn until SIGINT/SIGTERM; bad settings exit 2 with one line.

    ``check(settings)`` runs before the server starts (the cloud resolves its model and data there): a
    ValueError it raises (a ModelError, say) is bad settings too.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sleep_idle_threads()  # before torch loads
    from pydantic import ValidationError

    try:
        settings = parse_settings(prog, cls, argv)
        reuse_freed_memory(settings.heap)  # before the model loads
        settings.check_security()
        if check is not None:
            check(settings)
        app = create_app(settings)  # checks the credential against the trust key and the flags: one line if refused
    except (ValidationError, ValueError, OSError) as exc:
        print(f"{prog}: error: {str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else first_error(exc)}",
              file=sys.stderr)
        return 2
    import uvicorn

    from shared.http.connections import guarded_protocol, raise_open_files_limit

    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.insecure_dev:
        print(f"\n{'!' * 78}\n{prog}: INSECURE DEVELOPMENT MODE: calls are accepted WITHOUT credentials.\n"
              f"Never expose this service beyond a development machine.\n{'!' * 78}\n", file=sys.stderr, flush=True)
    raise_open_files_limit()  # a connection holds a descriptor; the per-peer cap keeps one host from taking them all
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                http=guarded_protocol(settings.header_timeout, settings.max_connections_per_peer), ws="none",
                timeout_graceful_shutdown=5, ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
    return 0
