"""Token verification: a JWT in, a principal (user id and expiry) out.

The only module that imports PyJWT. Algorithms are pinned per key: an HS256 secret never accepts an
RS256 token and the reverse, which closes the classic algorithm-confusion attack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
import jwt.types

from igratech_ws.core.channels import is_valid_id


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection is. `user_id` None means anonymous; `expires_at` is Unix seconds or None."""

    user_id: str | None
    expires_at: float | None = None


ANONYMOUS = Principal(None, None)


class AuthError(Exception):
    """The token cannot be accepted; the handshake is refused with HTTP 401 and this message."""


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    """Verifies JWTs with a shared secret (HS256) and/or a public key (RS256 / ES256).

    `leeway` seconds are allowed on `exp` and `nbf` for clock skew; `audience` and `issuer` are
    checked when set.
    """

    secret: str | None = None
    public_key: str | None = None
    public_key_algorithms: tuple[str, ...] = ("RS256", "ES256")
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.public_key)

    def verify(self, token: str) -> Principal:
        """Return the principal of `token`, or raise `AuthError` saying why it was refused."""
        if not self.enabled:
            raise AuthError("token authentication is not configured on this server")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        algorithm = header.get("alg")
        key: str
        if algorithm == "HS256" and self.secret:
            key = self.secret
        elif algorithm in self.public_key_algorithms and self.public_key:
            key = self.public_key
        else:
            raise AuthError(f"token algorithm {algorithm!r} is not accepted")
        options: jwt.types.Options = {"require": ["sub"], "verify_aud": self.audience is not None}
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not is_valid_id(subject):
            raise AuthError("token subject (sub) is not a valid user id")
        expires = claims.get("exp")
        return Principal(subject, float(expires) if isinstance(expires, (int, float)) else None)


def mint_token(
    secret: str,
    user_id: str,
    *,
    ttl: float = 3600.0,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """Mint an HS256 development token for `user_id` valid for `ttl` seconds."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(ttl)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
