"""A user's registration as the cloud checks it: the request the user itself signed for its edge, and what it says."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Annotated

from pydantic import BaseModel, Field

from shared.config.placement import MAX_NUM_SAMPLES, Declared
from shared.errors import InvalidInput
from shared.http.credentials import CredentialError, Principal, Verifier

Ident = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
DECLARED = ("model", "data", "max_blocks", "memory_budget", "rank")  # what a user declares of itself, as it signed it


class SignedRequest(BaseModel):
    """A request as its sender signed it: the signature headers and the body (base64), forwarded as proof."""

    headers: dict[str, str] = Field(max_length=8)
    body: str = Field(max_length=1 << 16)


class UserIn(BaseModel):
    """``POST /v1/edges/{edge_id}/users``: an edge telling the cloud of a user it registered.

    ``registration`` is the user's own signed registration request to that edge: proof that the user
    (not only its edge) asked to be registered there, with these declarations. Required outside
    development mode.
    """

    user_id: Ident
    num_samples: int = Field(ge=0, le=MAX_NUM_SAMPLES)
    registration: SignedRequest | None = None
    model: str | None = Field(None, max_length=2048, description="the model it declares it trains (its edge's)")
    data: str | None = Field(None, max_length=64, description="the task it trains (default: the deployment's first)")
    max_blocks: int | None = Field(None, ge=0, le=100_000, description="the most blocks its device holds")
    memory_budget: int | None = Field(None, ge=0, description="or the parameter bytes its device holds")
    rank: int | None = Field(None, ge=1, le=100_000, description="its LoRA rank")

    def declared(self) -> Declared:
        return Declared(self.model, self.data, self.max_blocks, self.memory_budget, self.rank)


def check_registration(verifier: Verifier, edge_id: str, body: UserIn) -> Principal:
    """The user signed a registration for this edge, recently, with this id, sample count and declarations."""
    proof = body.registration
    if proof is None:
        raise InvalidInput("a user's registration needs its signed request to its edge (registration)")
    try:
        raw = base64.b64decode(proof.body, validate=True)
        user, digest = verifier.request(proof.headers, "POST", "/v1/users", {f"edge:{edge_id}"})
    except (CredentialError, ValueError) as exc:
        raise InvalidInput(f"the user's registration does not verify: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != digest or user.role != "user":
        raise InvalidInput("the user's registration does not verify: not the body the user signed")
    try:
        signed = json.loads(raw)
    except (ValueError, RecursionError):  # too deep a nesting is a RecursionError
        signed = None
    if not isinstance(signed, dict):
        raise InvalidInput("the registration the user signed is not a JSON object")
    if signed.get("user_id") != body.user_id or user.id != body.user_id \
            or signed.get("num_samples") != body.num_samples:
        raise InvalidInput("the registration the user signed is for another user id or sample count")
    changed = [k for k in DECLARED if signed.get(k) != getattr(body, k)]
    if changed:
        raise InvalidInput(f"the registration the user signed declares other {', '.join(changed)}")
    return user
