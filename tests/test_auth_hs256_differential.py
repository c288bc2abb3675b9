"""The fast HS256 path accepts and refuses exactly the tokens PyJWT does, with the same claims."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igratech_ws.auth import AuthError, TokenVerifier

SECRET = "a-secret-that-is-long-enough-for-hs256-use"

_offsets = st.one_of(st.none(), st.integers(-100, 100), st.floats(-100, 100, allow_nan=False))
_text = st.one_of(st.none(), st.sampled_from(["api", "web", "other"]), st.integers(0, 3))


@st.composite
def _tokens(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    now = time.time()
    claims: dict[str, Any] = {}
    # Mostly valid tokens with one thing off, so that every rule is exercised often.
    sub = draw(st.sampled_from(["u-1"] * 6 + [None, "bad id!", "", 7]))
    if sub is not None:
        claims["sub"] = sub
    for name in ("exp", "nbf", "iat"):
        offset = draw(_offsets)
        if offset is not None:
            claims[name] = now + offset if draw(st.booleans()) else int(now + offset)
    if draw(st.integers(0, 7)) == 0:
        claims["exp"] = draw(st.sampled_from(["soon", None, True]))
    if draw(st.booleans()):
        claims["aud"] = draw(st.one_of(_text, st.lists(st.sampled_from(["api", "web"]), max_size=2)))
    if draw(st.booleans()):
        claims["iss"] = draw(_text)
    if draw(st.integers(0, 3)) == 0:
        claims["jti"] = draw(st.one_of(st.text(max_size=4), st.integers()))
    key = SECRET if draw(st.integers(0, 9)) else SECRET + "-wrong"
    # PyJWS signs any payload bytes: PyJWT's encode would refuse some of the claims tried here.
    token = jwt.PyJWS().encode(json.dumps(claims).encode(), key, algorithm="HS256")
    if draw(st.integers(0, 8)) == 0:
        token = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    return token, claims


def _outcome(verify: Any, token: str) -> tuple[str, Any]:
    try:
        principal = verify(token)
    except AuthError as error:
        return "refused", "expired" if "expired" in str(error) else "invalid"
    return "accepted", principal


def _pyjwt_verify(verifier: TokenVerifier) -> Any:
    def verify(token: str) -> Any:
        claims = verifier._decode_with_pyjwt(token, "HS256", SECRET)
        from igratech_ws.auth import Principal
        from igratech_ws.core.channels import is_valid_id

        subject = claims.get("sub")
        if not isinstance(subject, str) or not is_valid_id(subject):
            raise AuthError("token subject (sub) is not a valid user id")
        expires = claims.get("exp")
        return Principal(subject, float(expires) if isinstance(expires, (int, float)) else None)

    return verify


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    token=_tokens(),
    audience=st.sampled_from([None, "api"]),
    issuer=st.sampled_from([None, "web"]),
    leeway=st.sampled_from([0.0, 5.0, 60.0]),
)
def test_fast_path_agrees_with_pyjwt(
    token: tuple[str, dict[str, Any]], audience: str | None, issuer: str | None, leeway: float
) -> None:
    verifier = TokenVerifier(secret=SECRET, audience=audience, issuer=issuer, leeway=leeway)
    raw, claims = token
    ours = _outcome(verifier.verify, raw)
    theirs = _outcome(_pyjwt_verify(verifier), raw)
    # Claims within a second of a boundary may flip between the two calls; skip those.
    now = time.time()
    near_edge = any(
        isinstance(claims.get(n), (int, float)) and abs(claims[n] - now) < leeway + 2 and abs(abs(claims[n] - now) - leeway) < 2
        for n in ("exp", "nbf", "iat")
    )
    if not near_edge:
        assert ours[0] == theirs[0], (claims, ours, theirs)
        if ours[0] == "accepted":
            assert ours[1] == theirs[1]
