"""Token verification: a JWT in, a principal (user id and expiry) out.

The only module that imports PyJWT. Algorithms are pinned per key: an HS256 secret never accepts an
RS256 token and the reverse, which closes the classic algorithm-confusion attack. Public keys come
from a PEM (`jwt_public_key`: RS256 for an RSA key, ES256 for a P-256 key) and/or a JWKS file
(`jwt_jwks_file`): there the token's `kid` header picks the key, and each key accepts only the one
algorithm its JWK names (`alg`, or the default of its `kty`/`crv`). The JWKS file is read once, at
start: rotate keys by adding the new key, restarting, then removing the old one.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt
import jwt.types
import msgspec

from igratech_ws.core.channels import is_valid_id

if TYPE_CHECKING:
    from igratech_ws.config import Config

#: Keys a JWKS file may hold (a bound on a map filled from a file an operator may get wrong).
MAX_JWKS_KEYS = 100
#: Largest JWKS file read, in bytes.
MAX_JWKS_BYTES = 1_048_576
#: Longest token accepted (handshake headers are capped at 16 KB anyway).
MAX_TOKEN_LENGTH = 8192
#: Asymmetric algorithms a JWK may name, and the key type each needs. Symmetric (`oct`) keys are
#: refused: a shared secret belongs in `jwt_secret`, not in a key set that is often published.
_JWK_ALGORITHMS: dict[str, str] = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "EdDSA": "OKP",
}


class Principal(msgspec.Struct, frozen=True):
    """Who a connection is. `user_id` None means anonymous; `expires_at` is Unix seconds or None."""

    user_id: str | None
    expires_at: float | None = None


ANONYMOUS = Principal(None, None)


class AuthError(Exception):
    """The token cannot be accepted; the handshake is refused with HTTP 401 and this message."""


class JwksError(ValueError):
    """A JWKS file cannot be used; the message names the file and the key at fault."""


@dataclass(frozen=True, slots=True)
class JwksKey:
    """One key of a JWKS: the only algorithm it accepts and the key object PyJWT verifies with."""

    kid: str
    algorithm: str
    key: Any = field(repr=False)


def parse_jwks(text: str, *, source: str = "JWKS") -> dict[str, JwksKey]:
    """The keys of a JWKS document (``{"keys": [...]}``) by `kid`. Raises `JwksError`.

    Every key needs a unique `kid` and an asymmetric type; its algorithm is its `alg` (which must
    fit its `kty`) or, without `alg`, RS256 for RSA and ES256/384/512 for EC by curve.
    """
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise JwksError(f"{source}: not JSON: {exc}") from None
    raw_keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw_keys, list) or not raw_keys:
        raise JwksError(f'{source}: expected {{"keys": [...]}} with at least one key')
    if len(raw_keys) > MAX_JWKS_KEYS:
        raise JwksError(f"{source}: {len(raw_keys)} keys, at most {MAX_JWKS_KEYS} are accepted")
    keys: dict[str, JwksKey] = {}
    for index, raw in enumerate(raw_keys):
        where = f"{source}: keys[{index}]"
        if not isinstance(raw, dict):
            raise JwksError(f"{where}: not an object")
        kid = raw.get("kid")
        if not isinstance(kid, str) or not kid:
            raise JwksError(f"{where}: a `kid` is required to select the key")
        if kid in keys:
            raise JwksError(f"{where}: duplicate kid {kid!r}")
        kty = raw.get("kty")
        if raw.get("use") not in (None, "sig"):
            raise JwksError(f"{where}: `use` must be 'sig'")
        alg = raw.get("alg")
        if alg is not None and _JWK_ALGORITHMS.get(alg) != kty:
            raise JwksError(f"{where}: alg {alg!r} is not an accepted algorithm for kty {kty!r}")
        if kty not in ("RSA", "EC", "OKP"):
            raise JwksError(f"{where}: kty {kty!r} is not accepted (RSA, EC or OKP keys only)")
        if any(name in raw for name in ("d", "p", "q")):
            raise JwksError(f"{where}: holds a private key; publish only the public part")
        try:
            jwk = jwt.PyJWK(raw)
        except jwt.PyJWTError as exc:
            raise JwksError(f"{where}: {exc}") from None
        if _JWK_ALGORITHMS.get(jwk.algorithm_name) != kty:
            raise JwksError(f"{where}: algorithm {jwk.algorithm_name!r} is not accepted")
        keys[kid] = JwksKey(kid, jwk.algorithm_name, jwk.key)
    return keys


def load_jwks(path: str) -> dict[str, JwksKey]:
    """The keys of the JWKS file at `path` (see `parse_jwks`). Raises `JwksError` or `OSError`."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read(MAX_JWKS_BYTES + 1)
    if len(text) > MAX_JWKS_BYTES:
        raise JwksError(f"{path}: larger than {MAX_JWKS_BYTES} bytes")
    return parse_jwks(text, source=path)


def pem_algorithms(public_key: str) -> tuple[str, ...]:
    """The algorithms a PEM public key may verify: RS256 for RSA, ES256 for a P-256 EC key.

    Raises `ValueError` for a key that is not PEM, or of another type or curve.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key.encode())
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256",)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ("ES256",)
    raise ValueError("jwt_public_key must be an RSA or P-256 EC public key in PEM")


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    """Verifies JWTs with a shared secret (HS256), a PEM public key and/or a JWKS.

    `leeway` seconds are allowed on `exp` and `nbf` for clock skew; `audience` and `issuer` are
    checked when set. A token with a `kid` header is verified with that key of `jwks` (unknown
    `kid`: refused); a token without one uses the PEM key, or the JWKS's only key when it has one.
    """

    secret: str | None = None
    public_key: str | None = None
    public_key_algorithms: tuple[str, ...] = ("RS256", "ES256")
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 5.0
    jwks: Mapping[str, JwksKey] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_config(cls, config: Config) -> TokenVerifier:
        """The verifier `config` describes; reads the JWKS file. Raises `ValueError`/`OSError`."""
        return cls(
            secret=config.jwt_secret,
            public_key=config.jwt_public_key,
            public_key_algorithms=(
                pem_algorithms(config.jwt_public_key) if config.jwt_public_key else ()
            ),
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            leeway=config.jwt_leeway,
            jwks=load_jwks(config.jwt_jwks_file) if config.jwt_jwks_file else {},
        )

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.public_key or self.jwks)

    def _key_for(self, header: dict[str, Any]) -> tuple[str, Any]:
        algorithm = header.get("alg")
        kid = header.get("kid")
        if kid is not None and self.jwks:
            entry = self.jwks.get(kid) if isinstance(kid, str) else None
            if entry is None:
                raise AuthError("token key id (kid) is not known")
            if algorithm != entry.algorithm:
                raise AuthError(f"token algorithm {algorithm!r} is not accepted for this key")
            return entry.algorithm, entry.key
        if algorithm == "HS256" and self.secret:
            return algorithm, self.secret
        if algorithm in self.public_key_algorithms and self.public_key:
            return algorithm, self.public_key
        if kid is None and len(self.jwks) == 1:
            (entry,) = self.jwks.values()
            if algorithm == entry.algorithm:
                return entry.algorithm, entry.key
        raise AuthError(f"token algorithm {algorithm!r} is not accepted")

    def verify(self, token: str) -> Principal:
        """Return the principal of `token`, or raise `AuthError` saying why it was refused."""
        if not self.enabled:
            raise AuthError("token authentication is not configured on this server")
        segments = _split_token(token)
        algorithm, key = self._key_for(segments.header)
        if algorithm == "HS256":
            claims = self._decode_hs256(segments, key)
        else:
            claims = self._decode_with_pyjwt(token, algorithm, key)
        # One implementation of the time rules for every algorithm, so that the expiry the
        # connection enforces later is exactly the value checked here.
        expires = self._check_times(claims)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not is_valid_id(subject):
            raise AuthError("token subject (sub) is not a valid user id")
        return Principal(subject, expires)

    def _check_times(self, claims: dict[str, Any]) -> float | None:
        """Check `exp`, `nbf` and `iat` (RFC 7519 section 4.1.4-6: NumericDate, a JSON number)
        with `leeway`; return `exp` as the float the connection's expiry uses, or None.

        Stricter than PyJWT, which takes `int(value)` and so accepts ``"exp": "1900000000"`` and
        ``true``: a string, a boolean, or a number too large for a float (PyJWT accepts 1e400
        written as an integer; it would overflow the expiry) is refused on every path.
        """
        # Every claim's type is checked before any time is compared.
        exp = claims.get("exp", _MISSING)
        nbf = claims.get("nbf", _MISSING)
        iat = claims.get("iat", _MISSING)
        expires = None if exp is _MISSING else _numeric_date("exp", exp)
        not_before = None if nbf is _MISSING else _numeric_date("nbf", nbf)
        issued = None if iat is _MISSING else _numeric_date("iat", iat)
        now = time.time()
        leeway = self.leeway
        if expires is not None and expires <= now - leeway:
            raise AuthError("token expired")
        if not_before is not None and not_before > now + leeway:
            raise AuthError("invalid token: The token is not yet valid (nbf)")
        if issued is not None and issued > now + leeway:
            raise AuthError("invalid token: The token is not yet valid (iat)")
        return expires

    def _decode_hs256(self, segments: _Segments, secret: Any) -> dict[str, Any]:
        """Verify an HS256 token with the standard library: PyJWT spends about 0.5 ms of pure
        Python per token here, most of a handshake. The claim rules are PyJWT's (RFC 7519
        section 4.1) except the time claims, which `verify` checks on every path
        (`_check_times`); a differential test holds the two paths to the same answers."""
        expected = _hs256(secret, segments.signing_input)
        if not hmac.compare_digest(expected, segments.signature):
            raise AuthError("invalid token: Signature verification failed")
        claims = segments.claims()
        if "sub" not in claims:
            raise AuthError('invalid token: Token is missing the "sub" claim')
        if "jti" in claims and not isinstance(claims["jti"], str):
            raise AuthError("invalid token: the jti claim must be a string")
        if self.audience is not None:
            audience = claims.get("aud")
            if audience is None:
                raise AuthError('invalid token: Token is missing the "aud" claim')
            audiences = [audience] if isinstance(audience, str) else audience
            if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
                raise AuthError("invalid token: Invalid claim format in token")
            if self.audience not in audiences:
                raise AuthError("invalid token: Audience doesn't match")
        if self.issuer is not None:
            if "iss" not in claims:
                raise AuthError('invalid token: Token is missing the "iss" claim')
            if claims["iss"] != self.issuer:
                raise AuthError("invalid token: Invalid issuer")
        return claims

    def _decode_with_pyjwt(self, token: str, algorithm: str, key: Any) -> dict[str, Any]:
        """Signature, `aud`, `iss` and `sub` by PyJWT; the time claims by `_check_times` (which
        `verify` applies to every path), so PyJWT's looser `int(exp)` never decides."""
        options: jwt.types.Options = {
            "require": ["sub"],
            "verify_aud": self.audience is not None,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
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
        return claims


class _Segments:
    """A compact JWS split and decoded: header, raw claims, signature, signing input."""

    __slots__ = ("_payload", "header", "signature", "signing_input")

    def __init__(
        self, header: dict[str, Any], payload: bytes, signature: bytes, signing_input: bytes
    ):
        self.header = header
        self._payload = payload
        self.signature = signature
        self.signing_input = signing_input

    def claims(self) -> dict[str, Any]:
        try:
            claims = _json_decoder.decode(self._payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise AuthError("malformed token: the payload is not JSON") from None
        if not isinstance(claims, dict):
            raise AuthError("malformed token: the payload is not a JSON object")
        return claims


_json_decoder = msgspec.json.Decoder()


_MISSING: Any = object()


def _numeric_date(name: str, value: Any) -> float:
    """A time claim's value as a float: a JSON number (not a boolean), finite once a float."""
    kind = type(value)  # JSON decodes to exactly int, float, bool, str, list, dict or None
    if kind is float:
        number: float = value
    elif kind is int:
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    else:
        raise AuthError(f"invalid token: the {name} claim must be a number")
    if not math.isfinite(number):
        raise AuthError(f"invalid token: the {name} claim must be a finite number")
    return number


#: The two SHA-256 states of HMAC-SHA256 (RFC 2104) by secret, with the padded key already
#: hashed: a token costs a copy of each, its signing input and the inner digest. About 5,000
#: instructions fewer than copying a keyed `hmac` object (its Python wrapper, and OpenSSL's HMAC
#: context), the same answer (tests/auth: every key length against `hmac`).
_PADS: dict[str | bytes, tuple[Any, Any]] = {}
_MAX_PADS = 8
_SHA256_BLOCK = 64


def _hs256(secret: str | bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of `message` under `secret` (a str is its UTF-8 bytes)."""
    pads = _PADS.get(secret)
    if pads is None:
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        pads = (
            hashlib.sha256(key.translate(_IPAD)),
            hashlib.sha256(key.translate(_OPAD)),
        )
        if len(_PADS) >= _MAX_PADS:
            _PADS.clear()
        _PADS[secret] = pads
    inner = pads[0].copy()
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


_IPAD = bytes(byte ^ 0x36 for byte in range(256))
_OPAD = bytes(byte ^ 0x5C for byte in range(256))

_URLSAFE = bytes.maketrans(b"-_", b"+/")
#: Decoded JOSE headers by their encoded segment: the tokens of one issuer share one header, so
#: most handshakes skip its base64 and JSON (bounded; the dicts are only read).
_HEADERS: dict[str, Any] = {}
_MAX_HEADERS = 64
_MAX_CACHED_HEADER = 256


def _b64url(segment: str) -> bytes:
    # Strict mode refuses characters outside the base64url alphabet instead of skipping them, as
    # base64.b64decode(validate=True) does (and misplaced padding too).
    data = (segment + "=" * (-len(segment) % 4)).encode("ascii").translate(_URLSAFE)
    return binascii.a2b_base64(data, strict_mode=True)


def _header(segment: str) -> Any:
    header = _HEADERS.get(segment)
    if header is None:
        header = _json_decoder.decode(_b64url(segment))
        if isinstance(header, dict) and len(segment) <= _MAX_CACHED_HEADER:
            if len(_HEADERS) >= _MAX_HEADERS:
                _HEADERS.clear()
            _HEADERS[segment] = header
    return header


def _split_token(token: str) -> _Segments:
    """Split a compact JWS (RFC 7515 section 7.1) and decode its header; raise `AuthError`."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthError("malformed token: too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed token: not enough segments")
    head, body, tail = parts
    header = _HEADERS.get(head)
    try:
        if header is None:
            header = _header(head)
        payload = _b64url(body)
        signature = _b64url(tail)
    except (binascii.Error, ValueError, msgspec.DecodeError):  # UnicodeError is a ValueError
        raise AuthError("malformed token: invalid base64 or JSON") from None
    if not isinstance(header, dict):
        raise AuthError("malformed token: the header is not a JSON object")
    if "crit" in header or header.get("b64") is False:
        raise AuthError("token uses unsupported header parameters")
    # ASCII: the segments decoded as base64 are (a non-ASCII one raised above).
    signing_input = token[: len(head) + len(body) + 1].encode("ascii", "replace")
    return _Segments(header, payload, signature, signing_input)


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
