"""Per-identity credentials: certificates the deployment's key signs, and requests each tier signs with its own key.

A deployment has one Ed25519 key pair. Its private half issues credentials (``splitllm credentials
issue``); every tier holds its public half (``trust_key``) and verifies everything locally.

* A tier's credential (role ``cloud``, ``edge`` or ``user``) is a certificate, a JWT (EdDSA) the
  deployment key signs: ``{iss, dep, role, sub, iat, exp, jti, cnf: {x}}`` binding the tier's own
  Ed25519 public key (``cnf.x``, RFC 7800), plus the tier's private key. The tier never sends a
  secret: it signs every request (method, path, audience, time, nonce, body digest) with its key
  and sends the certificate beside the signature. A receiver checks the certificate, that the
  request was meant for it (the audience), that it is fresh and not a replay (nonce), and that the
  body is the one signed. A request one peer received can therefore not be used anywhere else.
* An admin credential (role ``admin``) is a plain signed JWT sent as ``Authorization: Bearer``
  to the cloud's round API only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ROLES = ("admin", "cloud", "edge", "user")
ISSUER = "splitllm"
SIGNATURE_VERSION = "splitllm/1"
CERT_HEADER, SIGNATURE_HEADER, SIGNED_HEADER = "x-splitllm-certificate", "x-splitllm-signature", "x-splitllm-signed"
MAX_SKEW = 300.0  # seconds a signed request's time may differ from the receiver's clock
MAX_NONCE = 64  # characters of a request's nonce (16 random bytes are 22 in base64url)
# signed requests one credential may make to one receiver in a nonce window (2 x MAX_SKEW): the receiver remembers
# each one's nonce that long, so these bound its memory for any one credential. 100 a second for a device; an edge
# relays its users' steps to the cloud, and a cloud starts every edge.
NONCES_PER_WINDOW = {"user": 60_000, "edge": 600_000, "cloud": 600_000}
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


class CredentialError(ValueError):
    """A credential or a signature that does not verify; ``reason`` says why (HTTP 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooManyRequests(CredentialError):
    """A valid credential over its allowance of signed requests in a nonce window (HTTP 429, ``retry_after``)."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Principal:
    """Who is calling, as a verified credential says."""

    role: str
    id: str
    jti: str
    issued_at: float
    client: int | None = None  # a user's data partition, as the admin assigned it
    data: str | None = None  # and the task (data set) it may train, where the admin bound one

    @property
    def subject(self) -> str:
        return f"{self.role}:{self.id}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def private_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def load_public_key(source: str | Path) -> Ed25519PublicKey:
    """The deployment's public key from a PEM file, or PEM text."""
    text = str(source)
    pem = text if text.lstrip().startswith("-----BEGIN") else Path(text).read_text()
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise CredentialError("the trust key must be an Ed25519 public key")
    return key


def load_private_key(source: str | Path) -> Ed25519PrivateKey:
    text = str(source)
    pem = text if text.lstrip().startswith("-----BEGIN") else Path(text).read_text()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialError("the signing key must be an Ed25519 private key")
    return key


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only (created 0600, never world-readable even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def init_deployment(directory: str | Path) -> tuple[Path, Path]:
    """A new deployment key pair: ``deployment.key`` (private, 0600) and ``deployment.pub`` (the trust key)."""
    directory = Path(directory)
    key_path, pub_path = directory / "deployment.key", directory / "deployment.pub"
    if key_path.exists():
        raise CredentialError(f"{key_path} exists: a deployment has one key (remove it to start a new deployment)")
    key = Ed25519PrivateKey.generate()
    write_private(key_path, private_pem(key))
    pub_path.write_text(public_pem(key.public_key()))
    return key_path, pub_path


@dataclass
class Credential:
    """What a tier holds: its certificate, and the private key the certificate binds (none for an admin)."""

    certificate: str
    key: Ed25519PrivateKey | None = None

    def principal(self) -> Principal:
        claims = jwt.decode(self.certificate, options={"verify_signature": False})
        return Principal(claims["role"], claims["sub"], claims["jti"], float(claims["iat"]), claims.get("client"),
                         claims.get("data"))

    def to_json(self) -> str:
        doc = {"certificate": self.certificate}
        if self.key is not None:
            doc["private_key"] = private_pem(self.key)
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Credential":
        try:
            doc = json.loads(text)
            key = load_private_key(doc["private_key"]) if doc.get("private_key") else None
            return cls(str(doc["certificate"]), key)
        except (ValueError, KeyError, TypeError) as exc:
            raise CredentialError(f"not a credential file: {exc}") from None

    @classmethod
    def load(cls, source: str | Path) -> "Credential":
        """A credential from its file (JSON from ``splitllm credentials issue``) or that file's text."""
        text = str(source)
        return cls.from_json(text if text.lstrip().startswith("{") else Path(text).read_text())

    def sign(self, method: str, path: str, audience: str, body: bytes = b"") -> dict[str, str]:
        """The headers of a request signed for ``audience`` (``cloud``, ``edge:<id>``, ``user:<id>``)."""
        if self.key is None:
            raise CredentialError("an admin credential is a bearer token; it cannot sign tier requests")
        params = f"ts={int(time.time())};nonce={b64url(secrets.token_bytes(16))};aud={audience};" \
                 f"digest={hashlib.sha256(body).hexdigest()}"
        signature = self.key.sign(signing_input(method, path, params))
        return {CERT_HEADER: self.certificate, SIGNED_HEADER: params, SIGNATURE_HEADER: b64url(signature)}


def signing_input(method: str, path: str, params: str) -> bytes:
    return f"{SIGNATURE_VERSION}\n{method.upper()}\n{path}\n{params}".encode()


def issue(signing_key: Ed25519PrivateKey, deployment: str, role: str, ident: str, ttl: float,
          client: int | None = None, data: str | None = None) -> Credential:
    """A new credential for ``role``/``ident``, valid ``ttl`` seconds; tiers get a fresh key pair of their own."""
    if role not in ROLES:
        raise CredentialError(f"unknown role '{role}'; roles: {', '.join(ROLES)}")
    if not ident or len(ident) > 128:
        raise CredentialError("an id is 1 to 128 characters")
    now = time.time()  # to the millisecond: a credential re-issued right after a revocation is not revoked by it
    claims: dict[str, Any] = {"iss": ISSUER, "dep": deployment, "role": role, "sub": ident, "iat": round(now, 3),
                              "exp": int(now + ttl), "jti": uuid.uuid4().hex}
    if client is not None:
        claims["client"] = int(client)
    if data is not None:
        claims["data"] = str(data)
    key = None
    if role != "admin":
        key = Ed25519PrivateKey.generate()
        claims["cnf"] = {"x": b64url(raw_public(key.public_key()))}
    return Credential(jwt.encode(claims, signing_key, algorithm="EdDSA"), key)


@dataclass
class Revocations:
    """Revoked credentials: by id (``jti``), or every credential of a subject issued before a time."""

    jtis: set[str] = field(default_factory=set)
    subjects: dict[str, float] = field(default_factory=dict)  # "user:user-3" -> credentials issued before are revoked
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def revoked(self, principal: Principal) -> bool:
        with self.lock:
            return principal.jti in self.jtis or principal.issued_at < self.subjects.get(principal.subject, -1.0)

    def add(self, jti: str | None = None, subject: str | None = None, before: float | None = None) -> None:
        with self.lock:
            if jti:
                self.jtis.add(jti)
            if subject:
                self.subjects[subject] = max(self.subjects.get(subject, -1.0), time.time() if before is None else before)

    def to_meta(self) -> dict[str, Any]:
        with self.lock:
            return {"jtis": sorted(self.jtis), "subjects": dict(sorted(self.subjects.items()))}

    def merge(self, meta: Mapping[str, Any]) -> None:
        """Take in a list another tier sent (the cloud's, with a round's start)."""
        for jti in meta.get("jtis", []) if isinstance(meta, Mapping) else []:
            if isinstance(jti, str):
                self.add(jti=jti)
        for subject, before in (meta.get("subjects", {}) if isinstance(meta, Mapping) else {}).items():
            if isinstance(subject, str) and isinstance(before, (int, float)) and not isinstance(before, bool):
                self.add(subject=subject, before=float(before))


class Verifier:
    """Checks credentials and signed requests against the deployment's trust key, with no call to anyone."""

    def __init__(self, trust_key: Ed25519PublicKey, deployment: str, revocations: Revocations | None = None,
                 max_skew: float = MAX_SKEW) -> None:
        self.trust_key, self.deployment, self.max_skew = trust_key, deployment, max_skew
        self.revocations = revocations or Revocations()
        # (jti, nonce) -> expiry of the memory of it, oldest first (expiries grow with the clock): pruned from the front
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._held: dict[str, int] = {}  # jti -> how many of its nonces are remembered
        self._lock = threading.Lock()

    def certificate(self, token: str, roles: Iterable[str] = ROLES) -> tuple[Principal, dict[str, Any]]:
        """The principal a certificate names, its claims; refuses a bad signature, another deployment, an expired
        or revoked credential, or a role outside ``roles``."""
        try:
            claims = jwt.decode(token, self.trust_key, algorithms=["EdDSA"], issuer=ISSUER,
                                options={"require": ["iss", "exp", "iat", "sub", "jti"]})
        except jwt.PyJWTError as exc:
            raise CredentialError(f"invalid credential: {exc}") from None
        if claims.get("dep") != self.deployment:
            raise CredentialError(f"the credential is for deployment '{str(claims.get('dep'))[:64]}', "
                                  f"not '{self.deployment}'")
        role, sub = claims.get("role"), claims.get("sub")
        if role not in ROLES or not isinstance(sub, str) or not isinstance(claims.get("jti"), str):
            raise CredentialError("the credential lacks a valid role, sub or jti")
        client, data = claims.get("client"), claims.get("data")
        principal = Principal(role, sub, claims["jti"], float(claims["iat"]),
                              client if isinstance(client, int) and not isinstance(client, bool) else None,
                              data if isinstance(data, str) else None)
        if role not in set(roles):
            raise CredentialError(f"a {role} credential may not be used here")
        if self.revocations.revoked(principal):
            raise CredentialError(f"the credential of {principal.subject} has been revoked")
        return principal, claims

    def request(self, headers: Mapping[str, str], method: str, path: str, audiences: Iterable[str]) -> tuple[Principal, str]:
        """A signed tier request: its principal and the body digest it signed (the caller checks the body)."""
        token, params, signature = (headers.get(h) for h in (CERT_HEADER, SIGNED_HEADER, SIGNATURE_HEADER))
        if not token or not params or not signature:
            raise CredentialError("missing request signature: a tier signs every request with its credential")
        principal, claims = self.certificate(token, ("cloud", "edge", "user"))
        fields = dict(part.partition("=")[::2] for part in params.split(";"))
        try:
            ts, nonce, aud, digest = float(fields["ts"]), fields["nonce"], fields["aud"], fields["digest"]
            public = Ed25519PublicKey.from_public_bytes(unb64url(claims["cnf"]["x"]))
            public.verify(unb64url(signature), signing_input(method, path, params))
        except Exception:  # a missing field, a malformed key or signature, or one that does not verify
            raise CredentialError("the request signature does not verify") from None
        if aud not in set(audiences):
            raise CredentialError(f"the request was signed for '{aud[:64]}', not for this tier")
        if not 0 < len(nonce) <= MAX_NONCE:
            raise CredentialError(f"the request's nonce must be 1 to {MAX_NONCE} characters (16 random bytes, base64url)")
        now = time.time()
        if not math.isfinite(ts):  # NaN would pass the skew check below: a request fresh for ever
            raise CredentialError(f"the request's time '{fields['ts'][:32]}' is not a number of seconds")
        if abs(now - ts) > self.max_skew:
            raise CredentialError(f"the request was signed {now - ts:.0f} s from now (more than {self.max_skew:.0f} s)")
        with self._lock:
            while self._seen and next(iter(self._seen.values())) <= now:  # each request prunes what expired, no more
                (jti, _), _ = self._seen.popitem(last=False)
                self._held[jti] -= 1
                if not self._held[jti]:
                    del self._held[jti]
            if (principal.jti, nonce) in self._seen:
                raise CredentialError("a replayed request (its nonce was used before)")
            allowed = NONCES_PER_WINDOW.get(principal.role, 0)
            if self._held.get(principal.jti, 0) >= allowed:
                raise TooManyRequests(f"this credential made {allowed} signed requests here in the last "
                                      f"{2 * self.max_skew:.0f} s, its allowance: retry later",
                                      max(1.0, next(iter(self._seen.values()), now) - now))
            self._seen[(principal.jti, nonce)] = now + 2 * self.max_skew
            self._held[principal.jti] = self._held.get(principal.jti, 0) + 1
        return principal, digest

    def bearer(self, token: str) -> Principal:
        """An admin's bearer credential."""
        principal, _ = self.certificate(token, ("admin",))
        return principal
