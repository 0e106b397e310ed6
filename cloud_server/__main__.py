"""`python -m cloud_server` / `splitllm cloud`: run the cloud tier as a service."""

from __future__ import annotations

import sys

from shared.http.service import serve
from shared.config.settings import CloudSettings


def main(argv: list[str] | None = None) -> int:
    from cloud_server.app import create_app
    from cloud_server.service import build_experiment

    return serve("splitllm cloud", CloudSettings, create_app, argv, check=build_experiment)


if __name__ == "__main__":
    sys.exit(main())
