"""Round tickets: the cloud's signed word that it started this user in this round through this edge.

A user takes a round's start only from its own edge, but the edge's credential alone would let a revoked edge (or
any edge) start rounds the cloud never ordered: the user would go on sending it activations. So the cloud signs,
for each user it starts, a ticket the edge relays unchanged in the user's start (``RoundStart.tickets`` ->
``UserStart.ticket``): ``{"certificate": the cloud's certificate, "token": a JWT, EdDSA, signed by the key that
certificate binds}``. Its claims bind the user (``aud``: ``user:<id>``), the edge, the time, and the whole plan the
device is to run (``plan``): not only its round, phase, steps, batch, cut and task, but its algorithm, config and
extras too, which decide the blocks a step runs (DropPEFT's ratio, DevFT's stage), and its seed, the rows and masks
drawn. The user checks it with the deployment's trust key alone, so an edge cannot make one, and one made for
another user, edge, round or plan is refused.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.errors import Forbidden, InvalidInput
from shared.http.credentials import ISSUER, MAX_SKEW, Credential, CredentialError, Verifier, unb64url
from shared.protocol.messages import RoundPlan

TICKET_TYPE = "splitllm-ticket"


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, types and all, at every depth: ``true`` is not 1, nor 1 the float 1.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def plan_differences(claim: Any, plan: RoundPlan) -> list[str]:
    """The fields in which the start's plan differs from the plan the cloud signed, each read as the user reads a
    plan (``RoundPlan.from_meta``: a field left out is its default, ``lr`` a float)."""
    try:
        signed = RoundPlan.from_meta(claim).to_meta()
    except InvalidInput as exc:
        raise Forbidden(f"the start's ticket carries no valid plan: {exc.reason}") from None
    sent = plan.to_meta()  # each side leaves out the same defaults: a field on one side only differs
    return [k for k in sorted(signed.keys() | sent.keys())
            if k not in signed or k not in sent or not same(signed[k], sent[k])]


def seconds(value: Any) -> float | None:
    """A claim's unix time as a float; None if it is not a number of seconds (NaN, an int past a float's range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def valid_now(iat: Any, exp: Any, skew: float) -> bool:
    """Whether a ticket signed at ``iat`` and valid until ``exp`` holds now, with ``skew`` seconds either way for the
    clocks' difference."""
    signed, until, now = seconds(iat), seconds(exp), time.time()
    return signed is not None and until is not None and signed - skew <= now <= until + skew


def issue_ticket(credential: Credential, plan: RoundPlan, edge_id: str, lifetime: float = MAX_SKEW) -> dict[str, str]:
    """The cloud's ticket for starting ``plan``'s user through ``edge_id``, valid ``lifetime`` seconds (at least
    ``MAX_SKEW``): the cloud gives it as long as it waits for the phase's reports, so that an edge starting many users,
    some of them slow or unreachable, still starts the last of them in time."""
    if credential.key is None:
        raise CredentialError("only a tier's credential, with its key, signs round tickets")
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": f"user:{plan.user_id}", "edge": edge_id, "iat": now,
              "exp": now + math.ceil(max(lifetime, MAX_SKEW)), "plan": plan.to_meta()}
    token = jwt.encode(claims, credential.key, algorithm="EdDSA", headers={"typ": TICKET_TYPE})
    return {"certificate": credential.certificate, "token": token}


def check_ticket(verifier: Verifier, ticket: Any, plan: RoundPlan, edge_id: str, user_id: str) -> None:
    """Refuse (403) a start at user ``user_id`` whose ticket is missing, not the cloud's, stale, or made for another
    start (another user's among them: its edge holds the tickets of all its users)."""
    if plan.user_id != user_id:
        raise Forbidden(f"the start's plan is for user '{plan.user_id[:64]}', not for this user ('{user_id}')")
    if not isinstance(ticket, dict) or not isinstance(ticket.get("certificate"), str) \
            or not isinstance(ticket.get("token"), str):
        raise Forbidden("the start carries no ticket from the cloud: the cloud did not start this round "
                        "(is the edge revoked?)")
    try:
        _, cert = verifier.certificate(ticket["certificate"], ("cloud",))
        public = Ed25519PublicKey.from_public_bytes(unb64url(cert["cnf"]["x"]))
        if jwt.get_unverified_header(ticket["token"]).get("typ") != TICKET_TYPE:  # no other token of the cloud's key
            raise ValueError(f"its type is not {TICKET_TYPE}")
        claims = jwt.decode(ticket["token"], public, algorithms=["EdDSA"], issuer=ISSUER, audience=f"user:{user_id}",
                            options={"require": ["iss", "aud", "iat", "exp"], "verify_iat": False, "verify_exp": False})
    except CredentialError as exc:
        raise Forbidden(f"the start's ticket: {exc}") from None
    except Exception as exc:  # a malformed key or token, a bad signature, another user's ticket
        raise Forbidden(f"the start's ticket does not verify: {str(exc)[:120]}") from None
    if claims["aud"] != f"user:{user_id}":  # PyJWT also takes a list that names it: a ticket names one user
        raise Forbidden(f"the start's ticket is for '{str(claims['aud'])[:64]}', not for user:{user_id}")
    if not valid_now(claims["iat"], claims["exp"], verifier.max_skew):
        raise Forbidden(f"the start's ticket is not valid now (signed at {str(claims['iat'])[:24]}, valid until "
                        f"{str(claims['exp'])[:24]}, {verifier.max_skew:.0f} s either way for the clocks)")
    if claims.get("edge") != edge_id:
        raise Forbidden(f"the start's ticket is for edge '{str(claims.get('edge'))[:64]}', not '{edge_id}'")
    differ = plan_differences(claims.get("plan"), plan)
    if differ:
        raise Forbidden(f"the start's plan differs from what the cloud signed in: {', '.join(differ)}")
