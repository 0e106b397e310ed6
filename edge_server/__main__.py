"""`python -m edge_server` / `splitllm edge`: run the edge tier as a service."""

from __future__ import annotations

import sys

from shared.http.service import serve
from shared.config.settings import EdgeSettings


def main(argv: list[str] | None = None) -> int:
    from edge_server.app import create_app

    return serve("splitllm edge", EdgeSettings, create_app, argv)


if __name__ == "__main__":
    sys.exit(main())
