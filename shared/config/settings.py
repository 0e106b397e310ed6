"""Service settings: flags over environment (``SPLITLLM_*``) over an optional JSON/TOML/YAML file over defaults."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.config.round import RoundDefaults


LINK_RATE_SHAPED = ("the network (tc) shapes this link's rates already: the emulator adds only the profile's "
                    "delay, jitter and loss")


class ServiceSettings(BaseSettings):
    """Settings every tier has."""

    model_config = SettingsConfigDict(env_prefix="SPLITLLM_", extra="forbid")

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, description="port to listen on")
    public_url: str | None = Field(None, description="URL the parent tier calls back on (default http://host:port)")
    max_message_bytes: int = Field(256 * 1024 * 1024, description="largest accepted message body")
    request_timeout: float = Field(600.0, description="seconds a call to another tier may take")
    device: str = Field("cpu", description="torch device for this tier's compute (cpu, cuda)")
    threads: int = Field(0, ge=0, description="CPU threads for this tier's tensor compute (0: torch's default, "
                                              "one per core); set it when several tiers share a machine")
    log_level: str = Field("info", description="uvicorn log level")
    token: SecretStr | None = Field(None, description="bearer token every tier-to-tier call carries (no default)")
    insecure_dev: bool = Field(False, description="development only: accept calls without tokens (announced loudly)")
    ssl_certfile: str | None = Field(None, description="TLS certificate (PEM) for uvicorn; serve HTTPS")
    ssl_keyfile: str | None = Field(None, description="TLS private key (PEM) for uvicorn")
    ca_file: str | None = Field(None, description="CA bundle to verify peers' TLS certificates (default: system)")
    max_tensor_elements: int = Field(64 * 1024 * 1024, description="largest tensor accepted from the network")

    def url(self) -> str:
        scheme = "https" if self.ssl_certfile else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}"

    def check_security(self) -> None:
        """No default token: a service without one refuses to start unless in insecure development mode."""
        if not self.insecure_dev and (self.token is None or not self.token.get_secret_value().strip()):
            raise ValueError("no token: set --token (or SPLITLLM_TOKEN) to a non-empty secret on every tier, "
                             "or pass --insecure-dev for local development")

    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token is not None else None


class CloudSettings(ServiceSettings, RoundDefaults):
    """The coordinator: it fixes the model, split, data and round defaults for every tier.

    The round defaults (``local_steps``, ``batch_size``, ``lr``, ``deadline``, ``min_participants``,
    ``clip_norm``) are declared once, in ``shared.config.round.RoundDefaults``.
    """

    port: int = 8000
    data_dir: Path = Field(Path("runs/cloud"), description="SQLite store and adapter versions live here")
    model: str = Field("minilm-l6", description="model directory, bundled name or tiny-* test model")
    split: str = Field("1,3", description="split points a,b")
    data: str = Field("trec", description="shakespeare, trec, sms_spam or sentiment")
    num_clients: int = Field(4, description="clients the data set is partitioned into (one per user)")
    partition: str = "default"
    dirichlet_alpha: float = 0.5
    max_examples_per_client: int | None = 256
    eval_examples_per_client: int = 32
    max_len: int = 64
    min_chars: int = Field(0, description="join consecutive texts (same label for classification) up to this many "
                                          "characters: full-length rows")
    pad_to_max: bool = Field(False, description="pad every training batch to max_len (fixed shapes)")
    rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=list)
    adapter: str = Field("lora", description="adapter form: lora, or svd (P diag(e) Q, what FedARA trains)")
    user_edge_codecs: str = Field("fp32", description="codecs on user-edge hops: int8, or activations=..,gradients=..,"
                                                      "uploads=..,downloads=..")
    edge_cloud_codecs: str = Field("fp32", description="codecs on edge-cloud hops (same form)")
    seed: int = 0
    round_timeout: float = Field(3600.0, description="seconds a round may take before it fails")
    admin_token: SecretStr | None = Field(None, description="bearer token of the round API (start, cancel)")

    def check_security(self) -> None:
        super().check_security()
        if not self.insecure_dev and (self.admin_token is None or not self.admin_token.get_secret_value().strip()):
            raise ValueError("no admin token: set --admin-token (or SPLITLLM_ADMIN_TOKEN) on the cloud, "
                             "or pass --insecure-dev for local development")


class EdgeSettings(ServiceSettings):
    port: int = 8100
    max_sessions: int = Field(64, description="concurrent user sessions; more get 503 with Retry-After")
    link_profile: str = Field("none", description="emulated link to the cloud: wifi, 4g, 5g, fiber or none")
    link_rate_shaped: bool = Field(False, description=LINK_RATE_SHAPED)
    cloud: str = Field("http://127.0.0.1:8000", description="URL of the cloud")
    edge_id: str | None = Field(None, description="this edge's id (default edge-<port>)")

    def ident(self) -> str:
        return self.edge_id or f"edge-{self.port}"


class UserSettings(ServiceSettings):
    port: int = 8200
    link_profile: str = Field("none", description="emulated link to the edge: wifi, 4g, 5g, fiber or none")
    link_rate_shaped: bool = Field(False, description=LINK_RATE_SHAPED)
    edge: str = Field("http://127.0.0.1:8100", description="URL of this user's edge")
    user_id: str | None = Field(None, description="this user's id (default user-<client index>)")
    client_index: int = Field(0, description="which client of the partitioned data set this device holds")
    slowdown: float = Field(1.0, ge=1.0, description="simulated slower device: compute takes this many times longer")

    @field_validator("client_index")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("client_index must be >= 0")
        return v

    def ident(self) -> str:
        return self.user_id or f"user-{self.client_index}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of settings from a .json, .toml or .yaml file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    elif path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"config file {path}: use .json, .toml or .yaml")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of setting names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_settings(cls: type[ServiceSettings], flags: dict[str, Any], config_file: str | None = None) -> ServiceSettings:
    """Flags (non-None) win over the environment, which wins over the file, which wins over defaults."""
    file_values = read_config_file(config_file) if config_file else {}
    from_env = cls()
    env_values = {k: getattr(from_env, k) for k in from_env.model_fields_set}
    return cls(**{**file_values, **env_values, **{k: v for k, v in flags.items() if v is not None}})
