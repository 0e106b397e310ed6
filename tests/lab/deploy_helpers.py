"""What the deployment tests share: a tier's settings exactly as the tier builds them from an environment and argv."""

from __future__ import annotations

import os

import pytest

from shared.config.settings import CloudSettings, EdgeSettings, UserSettings
from shared.http.service import parse_settings

CLASSES = {"cloud": CloudSettings, "edge": EdgeSettings, "user": UserSettings}


def tier_settings(tier: str, env: dict[str, str], args: list[str], monkeypatch: pytest.MonkeyPatch):
    """Only ``env``'s SPLITLLM_* variables (none of the caller's), then the tier's own flag parser on ``args``."""
    for key in list(os.environ):
        if key.startswith("SPLITLLM_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return parse_settings(tier, CLASSES[tier], args)
