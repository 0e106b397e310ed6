"""`python -m user_agent` / `splitllm user`: run the user tier as a service."""

from __future__ import annotations

import sys

from shared.http.service import serve
from shared.config.settings import UserSettings


def main(argv: list[str] | None = None) -> int:
    from user_agent.app import create_app

    return serve("splitllm user", UserSettings, create_app, argv)


if __name__ == "__main__":
    sys.exit(main())
