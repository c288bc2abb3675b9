"""Every verification path accepts and refuses exactly the same tokens, with the same principal.

Three paths are held together: the fast HS256 path (standard library), the PyJWT path of public
keys (here an ES256 PEM key, the path RS256 and JWKS tokens take), and a reference: PyJWT's own
`jwt.decode` with its default time checks, plus the rule the gateway adds (RFC 7519 section 2,
NumericDate: `exp`, `nbf` and `iat` are JSON numbers; a string, a boolean or a number that does not
fit a float is refused). PyJWT alone takes `int(value)`, so on main an ES256 token with
``"exp": "1900000000"`` was accepted and its connection never expired, while HS256 refused it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igratech_ws.auth import AuthError, Principal, TokenVerifier
from igratech_ws.core.channels import is_valid_id

SECRET = "a-secret-that-is-long-enough-for-hs256-use"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_PEM = (
    EC_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)

_offsets = st.one_of(st.none(), st.integers(-100, 100), st.floats(-100, 100, allow_nan=False))
_text = st.one_of(st.none(), st.sampled_from(["api", "web", "other"]), st.integers(0, 3))


def _odd_time(now: float) -> st.SearchStrategy[Any]:
    """Time claims that are not plain numbers, or are numbers at the edges."""
    return st.sampled_from(
        [
            "soon",
            "",
            None,
            True,
            False,
            str(int(now + 50)),  # a numeric string: PyJWT's int() takes it
            str(int(now - 50)),
            f"{now + 50:.3f}",
            [int(now + 50)],
            {"t": int(now + 50)},
            10**30,  # far future, fits a float
            10**400,  # does not fit a float
            -(10**400),
            1.5e308,
            float("nan"),  # json.dumps writes NaN / Infinity literals (not JSON)
            float("inf"),
            float("-inf"),
            0,
            -1,
            now + 50.75,
            -0.0,
        ]
    )


@st.composite
def _claims(draw: st.DrawFn) -> dict[str, Any]:
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
        if draw(st.integers(0, 5)) == 0:
            claims[name] = draw(_odd_time(now))
    if draw(st.booleans()):
        claims["aud"] = draw(
            st.one_of(_text, st.lists(st.sampled_from(["api", "web"]), max_size=2))
        )
    if draw(st.booleans()):
        claims["iss"] = draw(_text)
    if draw(st.integers(0, 3)) == 0:
        claims["jti"] = draw(st.one_of(st.text(max_size=4), st.integers()))
    return claims


def _sign(claims: dict[str, Any], algorithm: str, *, wrong_key: bool = False) -> str:
    # PyJWS signs any payload bytes: PyJWT's encode would refuse some of the claims tried here.
    payload = json.dumps(claims).encode()
    if algorithm == "HS256":
        key: Any = SECRET + "-wrong" if wrong_key else SECRET
    else:
        key = ec.generate_private_key(ec.SECP256R1()) if wrong_key else EC_KEY
    return jwt.PyJWS().encode(payload, key, algorithm=algorithm)


def _outcome(verify: Any, token: str) -> tuple[str, Any]:
    try:
        principal = verify(token)
    except AuthError as error:
        return "refused", "expired" if "expired" in str(error) else "invalid"
    return "accepted", principal


def _reference(verifier: TokenVerifier, key: Any, algorithm: str) -> Any:
    """PyJWT with its own time checks, plus the NumericDate rule; no code of auth.py."""

    def verify(token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=verifier.audience,
                issuer=verifier.issuer,
                leeway=verifier.leeway,
                options={"require": ["sub"], "verify_aud": verifier.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        for name in ("exp", "nbf", "iat"):
            if name in claims:
                value = claims[name]
                if type(value) not in (int, float):
                    raise AuthError(f"{name} is not a number")
                try:
                    if not math.isfinite(float(value)):
                        raise AuthError(f"{name} is not finite")
                except OverflowError:
                    raise AuthError(f"{name} does not fit a float") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not is_valid_id(subject):
            raise AuthError("token subject (sub) is not a valid user id")
        expires = claims.get("exp")
        return Principal(subject, None if expires is None else float(expires))

    return verify


def _near_edge(claims: dict[str, Any], leeway: float) -> bool:
    """Claims within a second or two of a boundary may flip between calls (and PyJWT compares
    `int(exp)`, a truncation): skip those."""
    now = time.time()
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        finite = type(value) in (int, float) and -1e300 < value < 1e300
        if finite and abs(abs(float(value) - now) - leeway) < 2:
            return True
    return False


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    claims=_claims(),
    wrong_key=st.integers(0, 9).map(lambda n: n == 0),
    tamper=st.integers(0, 8).map(lambda n: n == 0),
    audience=st.sampled_from([None, "api"]),
    issuer=st.sampled_from([None, "web"]),
    leeway=st.sampled_from([0.0, 5.0, 60.0]),
)
def test_every_path_agrees_with_pyjwt_and_the_numeric_date_rule(
    claims: dict[str, Any],
    wrong_key: bool,
    tamper: bool,
    audience: str | None,
    issuer: str | None,
    leeway: float,
) -> None:
    if _near_edge(claims, leeway):
        return
    verifier = TokenVerifier(
        secret=SECRET,
        public_key=EC_PEM,
        public_key_algorithms=("ES256",),
        audience=audience,
        issuer=issuer,
        leeway=leeway,
    )
    for algorithm, key in (("HS256", SECRET), ("ES256", EC_PEM)):
        token = _sign(claims, algorithm, wrong_key=wrong_key)
        if tamper:
            token = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        ours = _outcome(verifier.verify, token)
        theirs = _outcome(_reference(verifier, key, algorithm), token)
        assert ours[0] == theirs[0], (algorithm, claims, ours, theirs)
        if ours[0] == "accepted":
            # The expiry the connection enforces is the one that was verified.
            assert ours[1] == theirs[1], (algorithm, claims)


# --- the cases of issue 9, item 7, spelled out --------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "ES256"])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("exp", "numeric string"),
        ("exp", True),
        ("exp", 10**400),
        ("nbf", "numeric string"),
        ("nbf", False),
        ("iat", "numeric string"),
        ("iat", [1]),
    ],
)
def test_time_claims_that_are_not_numbers_are_refused_on_every_path(
    algorithm: str, name: str, value: Any
) -> None:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "u-1", "iat": now - 10, "exp": now + 3600}
    claims[name] = (
        str(now + 3600 if name == "exp" else now - 10) if value == "numeric string" else value
    )
    verifier = TokenVerifier(secret=SECRET, public_key=EC_PEM, public_key_algorithms=("ES256",))
    with pytest.raises(AuthError, match=f"the {name} claim must be a"):
        verifier.verify(_sign(claims, algorithm))


@pytest.mark.parametrize("algorithm", ["HS256", "ES256"])
def test_the_principal_carries_the_verified_expiry(algorithm: str) -> None:
    expires = time.time() + 3600.25
    verifier = TokenVerifier(secret=SECRET, public_key=EC_PEM, public_key_algorithms=("ES256",))
    principal = verifier.verify(_sign({"sub": "u-1", "exp": expires}, algorithm))
    assert principal == Principal("u-1", expires)
    assert verifier.verify(_sign({"sub": "u-1", "exp": 10**30}, algorithm)).expires_at == 1e30


@pytest.mark.parametrize("length", [0, 1, 32, 63, 64, 65, 200])
def test_the_hs256_mac_is_rfc_2104_hmac_for_any_key_length(length: int) -> None:
    """The cached pad states (`auth._hs256`, a copy of each per message) give HMAC-SHA256 for
    keys shorter, as long as, and longer than SHA-256's block, message after message, and for
    key bytes of every value (the pads are XORs by table)."""
    import hashlib
    import hmac

    from igratech_ws.auth import _hs256

    secret = ("k" * length).encode()
    for message in (b"", b"a.b", b"x" * 1000):
        assert _hs256(secret, message) == hmac.new(secret, message, hashlib.sha256).digest()
        assert (
            _hs256(secret.decode(), message) == hmac.new(secret, message, hashlib.sha256).digest()
        )
        binary = bytes((n * 37 + 11) % 256 for n in range(length))
        assert _hs256(binary, message) == hmac.new(binary, message, hashlib.sha256).digest()
    key = "k" * max(length, 32)  # PyJWT warns about shorter ones
    token = jwt.encode({"sub": "u-1"}, key, "HS256")
    assert TokenVerifier(secret=key).verify(token) == Principal("u-1", None)
    with pytest.raises(AuthError, match="Signature verification failed"):
        TokenVerifier(secret=key + "x").verify(token)
