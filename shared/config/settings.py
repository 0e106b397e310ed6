"""Service settings: flags over environment (``SPLITLLM_*``) over an optional JSON/TOML/YAML file over defaults."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.config.heap import HEAP_MODES
from shared.config.round import RoundDefaults
from shared.config.threads import AUTOCAST_MODES


MIN_SECRET_CHARS = 24  # shared development secrets: at least this long


def check_shared_secrets(token: str | None, admin_token: str | None) -> None:
    """Development secrets must be strong and different from each other (ValueError otherwise)."""
    for name, value in (("token", token), ("admin_token", admin_token)):
        if value is not None and len(value) < MIN_SECRET_CHARS:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {MIN_SECRET_CHARS} characters "
                             f"(e.g. openssl rand -hex 24)")
    if token is not None and admin_token is not None and token == admin_token:
        raise ValueError("--token and --admin-token must differ: a tier must not hold the round API's secret")


BLOCK_COPIES = ("copies of this tier's blocks, sharing the frozen weights, so that as many sessions' forwards run at "
                "once (1: one forward at a time; 0: the cores over --threads on a CPU, 1 on a GPU); more than 1 "
                "pays where the tier has its cores to itself, not where several tiers share them")
LINK_RATE_SHAPED = ("the network (tc) shapes this link's rates already: the emulator adds only the profile's "
                    "delay, jitter and loss")


class ServiceSettings(BaseSettings):
    """Settings every tier has."""

    model_config = SettingsConfigDict(env_prefix="SPLITLLM_", extra="forbid")
    role: ClassVar[str] = ""  # the role a tier's credential must have

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, description="port to listen on")
    public_url: str | None = Field(None, description="URL the parent tier calls back on (default http://host:port)")
    max_message_bytes: int = Field(256 * 1024 * 1024, description="largest accepted message body")
    max_inflight_bytes: int | None = Field(None, description="bytes of message bodies held at once (reading, "
                                                             "decoding, handling); more get 503 with Retry-After "
                                                             "(default 4 x max_message_bytes)")
    min_body_rate: int = Field(16384, ge=1, description="bytes per second a request body must keep arriving at "
                                                        "once --body-grace seconds have passed; slower gets 408 "
                                                        "and its share of the in-flight budget back")
    body_grace: float = Field(30.0, gt=0, description="seconds a request body may take before --min-body-rate applies")
    header_timeout: float = Field(20.0, gt=0, description="seconds a connection may take to send a request's whole "
                                                          "head, from opening or from the reply before; then it is "
                                                          "closed (with 408 if part of a head came); a connection "
                                                          "whose peer reads none of its replies for that long is "
                                                          "dropped")
    max_connections_per_peer: int = Field(256, ge=0, description="connections one peer address (IPv6: its /64) may "
                                                                 "hold open at once; one more gets 503 and is closed "
                                                                 "(0: no cap)")
    request_timeout: float = Field(600.0, description="seconds a call to another tier may take")
    device: str = Field("cpu", description="torch device for this tier's compute (cpu, cuda)")
    threads: int = Field(0, ge=0, description="CPU threads for this tier's tensor compute (0: torch's default, "
                                              "one per core); set it when several tiers share a machine")
    autocast: Literal[AUTOCAST_MODES] = Field("off", description="mixed precision for this tier's compute: torch "
                                                               "autocast with matmuls in bfloat16 (CPUs with "
                                                               "AVX512-BF16 or AMX, recent GPUs); adapters, optimizer "
                                                               "and the tensors sent stay float32")
    heap: Literal[HEAP_MODES] = Field("system", description="reuse: this process keeps the memory a step frees "
                                                            "for the next step (glibc's malloc; fewer page faults, "
                                                            "more resident memory); system: malloc as it is")
    log_level: str = Field("info", description="uvicorn log level")
    credential: SecretStr | None = Field(None, description="this tier's credential: the file `splitllm credentials issue` "
                                                         "wrote, or its JSON text")
    trust_key: str | None = Field(None, description="the deployment's public key (deployment.pub from `splitllm "
                                                    "credentials init`, or its PEM text): every credential is checked "
                                                    "against it")
    deployment: str = Field("splitllm", min_length=1, max_length=128,
                            description="the deployment's name; credentials name the deployment they are for")
    insecure_dev: bool = Field(False, description="development only: no credentials; the shared --token (and the "
                                                  "cloud's --admin-token) if set, else nothing is checked (announced "
                                                  "loudly)")
    token: SecretStr | None = Field(None, description="development only (with --insecure-dev): one bearer secret "
                                                      "shared by the tiers")
    ssl_certfile: str | None = Field(None, description="TLS certificate (PEM) for uvicorn; serve HTTPS")
    ssl_keyfile: str | None = Field(None, description="TLS private key (PEM) for uvicorn")
    ca_file: str | None = Field(None, description="CA bundle to verify peers' TLS certificates (default: system)")
    max_tensor_elements: int = Field(64 * 1024 * 1024, description="largest tensor accepted from the network")
    callback_hosts: list[str] = Field(default_factory=lambda: ["*"],
                                      description="hosts a registering tier may give as its callback URL (shell "
                                                  "patterns); link-local and cloud metadata addresses are always refused")

    @model_validator(mode="after")
    def _room_for_a_body(self) -> "ServiceSettings":
        if self.max_inflight_bytes is not None and self.max_inflight_bytes < self.max_message_bytes:
            raise ValueError(f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least max_message_bytes "
                             f"({self.max_message_bytes}), or the largest body could never be read")
        return self

    def inflight_limit(self) -> int:
        """``max_inflight_bytes``, or 4 x ``max_message_bytes`` when it is not set."""
        return self.max_inflight_bytes if self.max_inflight_bytes is not None else 4 * self.max_message_bytes

    def caller_inflight_limit(self) -> int:
        """What one caller (one credential) may hold of the in-flight budget: half of it, and at least one body."""
        return max(self.max_message_bytes, self.inflight_limit() // 2)

    def url(self) -> str:
        scheme = "https" if self.ssl_certfile else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}"

    def check_security(self) -> None:
        """Outside development mode a tier needs its credential and the deployment's trust key; shared tokens
        are for development only, and even there strong and distinct."""
        if self.insecure_dev:
            check_shared_secrets(self.token_value(), self.admin_secret())
            return
        if self.token is not None:
            raise ValueError("--token is a shared secret for development only (with --insecure-dev); in production "
                             "every tier has a credential of its own: splitllm credentials issue")
        missing = [name for name in ("credential", "trust_key") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"no {' or '.join(missing)}: give every tier --credential (its file from `splitllm "
                             f"credentials issue`) and --trust-key (deployment.pub), or pass --insecure-dev for local "
                             f"development")

    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token is not None else None

    def admin_secret(self) -> str | None:
        """The round API's development secret (the cloud's only)."""
        return None

    def credential_value(self) -> str | None:
        return self.credential.get_secret_value() if self.credential is not None else None


class DeploymentEntry(BaseModel):
    """Another model the cloud serves (``--deployments``), beside the one ``--model`` names; unset fields take the
    cloud's own settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="model directory, bundled name or tiny-<model type> test model")
    name: str | None = Field(None, description="its name in the federation (default: the model's)")
    split: str | None = Field(None, description="its split points a,b (default: the middle of the model)")
    data: str = Field(min_length=1, description="its tasks: one data set or several, comma-separated")
    rank: int | None = Field(None, ge=1, description="its LoRA rank: the largest a user of it may declare")
    target_modules: list[str] | None = None
    tokenizer: str | None = None


class CloudSettings(ServiceSettings, RoundDefaults):
    """The coordinator: it fixes the model, split, data and round defaults for every tier.

    The round defaults (``local_steps``, ``batch_size``, ``lr``, ``deadline``, ``min_participants``,
    ``clip_norm``) are declared once, in ``shared.config.round.RoundDefaults``.
    """

    role: ClassVar[str] = "cloud"
    port: int = 8000
    data_dir: Path = Field(Path("runs/cloud"), description="SQLite store and adapter versions live here")
    model: str = Field("minilm-l6", description="model directory, bundled name or tiny-<model type> test model")
    tokenizer: str = Field("", description="tokenizer for a model directory without one: a directory with tokenizer "
                                           "files, a bundled model, or 'byte' (default: the model's own, else byte-level)")
    split: str = Field("1,3", description="split points a,b")
    data: str = Field("trec", description="shakespeare, trec, sms_spam or sentiment; several comma-separated: "
                                          "each a task of the model, with a head of its own")
    deployments: list[DeploymentEntry] = Field(default_factory=list, description="more models to serve at once, as a JSON "
                                               "list: [{\"model\": \"smollm2-135m\", \"split\": \"2,15\", "
                                               "\"data\": \"sentiment\", \"rank\": 32}]")
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
    u_shaped: bool = Field(False, description="labels never leave the device: the user holds the head and the loss, "
                                              "the cloud returns its output activations and gets their gradient back")
    user_edge_codecs: str = Field("fp32", description="codecs on user-edge hops: int8, or activations=..,gradients=..,"
                                                      "uploads=..,downloads=..")
    edge_cloud_codecs: str = Field("fp32", description="codecs on edge-cloud hops (same form)")
    seed: int = 0
    round_timeout: float = Field(3600.0, description="seconds a round may take before it fails")
    block_copies: int = Field(1, ge=0, description=BLOCK_COPIES)
    max_samples_per_user: int | None = Field(None, ge=1, description="the largest weight a user without an assigned "
                                             "data client may claim (default: the largest client of this deployment)")
    admin_token: SecretStr | None = Field(None, description="development only (with --insecure-dev): the round API's "
                                                            "bearer secret")

    def admin_secret(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token is not None else None

    def check_security(self) -> None:
        super().check_security()
        if not self.insecure_dev and self.admin_token is not None:
            raise ValueError("--admin-token is for development only (with --insecure-dev); in production an admin "
                             "holds a credential: splitllm credentials issue --role admin")


class EdgeSettings(ServiceSettings):
    role: ClassVar[str] = "edge"
    port: int = 8100
    max_sessions: int = Field(64, description="concurrent user sessions; more get 503 with Retry-After")
    block_copies: int = Field(1, ge=0, description=BLOCK_COPIES)
    start_timeout: float = Field(30.0, gt=0, description="seconds a user may take to accept its round's start (it "
                                                         "answers at once, 202): a slower one is dropped from the round")
    link_profile: str = Field("none", description="emulated link to the cloud: wifi, 4g, 5g, fiber or none")
    link_rate_shaped: bool = Field(False, description=LINK_RATE_SHAPED)
    cloud: str = Field("http://127.0.0.1:8000", description="URL of the cloud")
    edge_id: str | None = Field(None, description="this edge's id (default: its credential's, else edge-<port>)")
    model: str | None = Field(None, description="the model deployment this edge serves, where its cloud serves "
                                                "several (default: the cloud's first)")

    def ident(self) -> str:
        return self.edge_id or f"edge-{self.port}"


class UserSettings(ServiceSettings):
    role: ClassVar[str] = "user"
    port: int = 8200
    link_profile: str = Field("none", description="emulated link to the edge: wifi, 4g, 5g, fiber or none")
    link_rate_shaped: bool = Field(False, description=LINK_RATE_SHAPED)
    edge: str = Field("http://127.0.0.1:8100", description="URL of this user's edge")
    user_id: str | None = Field(None, description="this user's id (default: its credential's, else user-<client index>)")
    client_index: int = Field(0, description="which client of the partitioned data set this device holds")
    model: str | None = Field(None, description="the model it trains: its edge's (checked at registration)")
    data: str | None = Field(None, description="the task (data set) it trains, where its model trains several "
                                               "(default: the first)")
    max_blocks: int | None = Field(None, ge=0, description="the most blocks this device can hold: the cloud assigns its "
                                                           "cut up to this (and up to the deployment's b)")
    memory_budget: int | None = Field(None, ge=0, description="or the bytes of model parameters it can hold "
                                                              "(embeddings, blocks and their adapters)")
    rank: int | None = Field(None, ge=1, description="its LoRA rank, up to the deployment's (default: the deployment's)")
    slowdown: float = Field(1.0, ge=1.0, description="simulated slower device: compute takes this many times longer")
    heartbeat: float = Field(15.0, ge=0, description="seconds between checks that the edge still knows this user; "
                                                     "it registers again if not (an edge that restarted); 0: never")

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
