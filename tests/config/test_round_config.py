"""The round configuration is declared once: the REST body, the settings, the simulator and the CLI agree."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from shared.config.flags import add_model_flags, model_flag_values
from shared.config.round import RoundBody, RoundConfig, RoundDefaults, default_lr, merge
from shared.config.settings import CloudSettings
from shared.errors import InvalidInput
from shared.lab.cli import build_parser
from shared.lab.sim import SimConfig


def test_defaults_are_declared_once_and_seen_everywhere() -> None:
    config, settings, sim = RoundConfig(), CloudSettings(), SimConfig()
    for name in RoundDefaults.model_fields:
        assert getattr(settings, name) == getattr(config, name) == getattr(sim.round, name), name
    assert config.local_steps == 20 and config.batch_size == 8 and config.deadline == 600.0
    parser = build_parser()
    sim_args = parser.parse_args(["sim"])
    assert model_flag_values(sim_args, RoundConfig) == {}  # unset flags: the declaration's defaults apply
    help_text = parser._subparsers._group_actions[0].choices["sim"].format_help()  # noqa: SLF001 - argparse has no API
    assert "training steps each user runs in a round (default: 20)" in " ".join(help_text.split())


def test_the_learning_rate_help_matches_default_lr() -> None:
    description = RoundConfig.model_fields["lr"].description
    assert f"{default_lr('cls'):g} for classification" in description
    assert f"{default_lr('lm'):g} for language modelling" in description
    assert RoundConfig().resolved("lm").lr == default_lr("lm") == 2e-4
    assert RoundConfig(lr=0.1).resolved("cls").lr == 0.1


def test_the_rest_body_has_every_field_optional_with_the_same_checks() -> None:
    assert RoundBody.model_fields.keys() == RoundConfig.model_fields.keys()
    assert RoundBody().model_dump(exclude_none=True) == {}
    for bad in ({"local_steps": 0}, {"fraction": 1.5}, {"lr": -1}, {"deadline": 0}, {"min_participants": 0},
                {"batch_size": 5000}, {"algorithm": ""}):
        with pytest.raises(ValidationError):
            RoundBody(**bad)


def test_merge_takes_the_body_over_the_settings() -> None:
    settings = CloudSettings(local_steps=7, deadline=30.0, clip_norm=2.0)
    merged = merge(RoundBody(batch_size=4, algorithm="droppeft"), settings)
    assert (merged.local_steps, merged.batch_size, merged.deadline, merged.clip_norm, merged.algorithm) == \
        (7, 4, 30.0, 2.0, "droppeft")
    assert merge(None, settings).local_steps == 7


def test_settings_validate_round_defaults_like_the_body() -> None:
    with pytest.raises(ValidationError):
        CloudSettings(local_steps=0)
    with pytest.raises(ValidationError):
        CloudSettings(deadline=-1)


def test_flags_parse_lists_maps_and_switches() -> None:
    parser = argparse.ArgumentParser()
    add_model_flags(parser, RoundConfig)
    args = parser.parse_args(["--participants", "u1,u2", "--algorithm-config", '{"ratio": 0.2}', "--no-evaluate",
                              "--local-steps", "3"])
    config = RoundConfig(**model_flag_values(args, RoundConfig))
    assert config.participants == ["u1", "u2"] and config.config == {"ratio": 0.2} and config.evaluate is False
    assert config.local_steps == 3
    with pytest.raises(InvalidInput, match="--algorithm-config must be a JSON object"):
        model_flag_values(parser.parse_args(["--algorithm-config", "[1]"]), RoundConfig)
