"""The round configuration, declared once: the REST body, the cloud's settings, the simulator and the CLI derive from it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from shared.errors import InvalidInput

MAX_DEADLINE = 7 * 24 * 3600.0


def default_lr(task: str) -> float:
    """AdamW step size when none is given: a fresh classification head wants a larger one than LoRA alone.

    Language modelling uses 2e-4: on smollm2-135m / Shakespeare, 1e-3 overfits each character's few
    speeches within one round (held-out loss rose in round 2), 2e-4 lowers it round over round.
    """
    return 5e-3 if task == "cls" else 2e-4


class RoundDefaults(BaseModel):
    """The round fields whose deployment-wide defaults the cloud's settings may change (``--local-steps``, ...)."""

    local_steps: int = Field(20, ge=1, le=100_000, description="training steps each user runs in a round")
    batch_size: int = Field(8, ge=1, le=4096, description="examples per training step")
    micro_batches: int = Field(1, ge=1, le=4096, description="micro-batches a step's batch is split into, sent through "
                               "the tiers as a pipeline (1: the whole batch at once; at most batch_size)")
    lr: float | None = Field(None, gt=0, le=10, description=f"AdamW learning rate (default: {default_lr('cls'):g} for "
                                                             f"classification, {default_lr('lm'):g} for language modelling)")
    deadline: float | None = Field(600.0, gt=0, le=MAX_DEADLINE,
                                   description="seconds after a round starts when users that have not reported are dropped")
    min_participants: int = Field(1, ge=1, description="users that must report for the round to commit")
    clip_norm: float | None = Field(None, gt=0, description="clip each update's change to this L2 norm before aggregation")
    clip_factor: float | None = Field(3.0, ge=0, le=1000, description="with 3 or more updates to combine, clip each "
                                      "one's change to this many times their median change norm (0 or null: off)")


class RoundConfig(RoundDefaults):
    """One round: who trains, how long, with which algorithm, and the fault and clipping rules."""

    model_config = ConfigDict(extra="forbid")

    participants: list[str] | None = Field(None, description="user ids to train (default: every registered user)")
    fraction: float | None = Field(None, gt=0, le=1, description="or a random fraction of the registered users")
    algorithm: str = Field("fedavg", min_length=1, max_length=64, description="the algorithm plug-in")
    config: dict[str, Any] = Field(default_factory=dict, description="the algorithm's options (a JSON object)",
                                   json_schema_extra={"flag": "algorithm-config"})
    evaluate: bool = Field(True, description="evaluate the new version on every participant's held-out split")
    aggregator: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="how updates are combined: the algorithm's mean, or the coordinate-wise median or "
                            "trimmed mean (robust to a minority of bad updates; unweighted)")
    trim: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: the share of each end of every coordinate dropped")

    @model_validator(mode="after")
    def _micro_batches_fit(self) -> "RoundConfig":
        if self.micro_batches > self.batch_size:
            raise ValueError(f"micro_batches ({self.micro_batches}) must not exceed batch_size ({self.batch_size})")
        return self

    def resolved(self, task: str) -> "RoundConfig":
        """This configuration with the task's learning rate filled in where none is set."""
        return self if self.lr is not None else self.model_copy(update={"lr": default_lr(task)})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def _optional(name: str) -> tuple[Any, Any]:
    """The field ``name`` of RoundConfig with the same checks and help, but None (the settings' value) by default."""
    info = RoundConfig.model_fields[name]
    annotation = Annotated[info.annotation | None, *info.metadata] if info.metadata else info.annotation | None
    return (annotation,
            Field(None, description=info.description, json_schema_extra=info.json_schema_extra))


RoundBody = create_model(
    "RoundBody", __config__=ConfigDict(extra="forbid"),
    __doc__="``POST /v1/rounds``: every field may be left out; the cloud's settings fill it in.",
    **{name: _optional(name) for name in RoundConfig.model_fields},
)


def merge(body: BaseModel | None, defaults: Any) -> RoundConfig:
    """A round's configuration: the body's fields where given, else ``defaults``' (the cloud's settings)."""
    given = body.model_dump(exclude_none=True) if body is not None else {}
    base = {name: getattr(defaults, name) for name in RoundDefaults.model_fields if getattr(defaults, name) is not None}
    try:
        return RoundConfig(**{**base, **given})
    except ValidationError as exc:  # fields valid one by one, not together (micro_batches over batch_size): 422
        raise InvalidInput("; ".join(e["msg"] for e in exc.errors())) from None
