"""Public-key tokens: PEM keys and JWKS files, with the algorithm pinned per key."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from igratech_ws.auth import AuthError, JwksError, TokenVerifier, load_jwks, parse_jwks
from igratech_ws.config import Config

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwk(private: Any, kid: str, **extra: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
    jwk: dict[str, Any] = algorithm.to_jwk(private.public_key(), as_dict=True)
    jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def _pem(private: Any) -> str:
    encoded: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encoded.decode()


def _token(private: Any, algorithm: str, kid: str | None = None, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": "u-1", "iat": now, "exp": now + 60, **claims}
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(body, private, algorithm=algorithm, headers=headers)


def _jwks_file(tmp_path: Path, *keys: dict[str, Any]) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": list(keys)}))
    return str(path)


def _verifier(tmp_path: Path, *keys: dict[str, Any], **config: Any) -> TokenVerifier:
    return TokenVerifier.from_config(
        Config(jwt_jwks_file=_jwks_file(tmp_path, *keys)).with_overrides(config)
    )


def test_the_kid_header_selects_the_key(tmp_path: Path) -> None:
    verifier = _verifier(
        tmp_path, _jwk(RSA_KEY, "r1", alg="RS256"), _jwk(RSA_OTHER, "r2"), _jwk(EC_KEY, "e1")
    )
    assert verifier.verify(_token(RSA_KEY, "RS256", "r1")).user_id == "u-1"
    assert verifier.verify(_token(RSA_OTHER, "RS256", "r2")).user_id == "u-1"
    assert verifier.verify(_token(EC_KEY, "ES256", "e1")).user_id == "u-1"
    # Signed by another key than the one its kid names.
    with pytest.raises(AuthError, match="invalid token"):
        verifier.verify(_token(RSA_OTHER, "RS256", "r1"))
    with pytest.raises(AuthError, match="kid"):
        verifier.verify(_token(RSA_KEY, "RS256", "unknown"))


def test_each_key_accepts_only_its_own_algorithm(tmp_path: Path) -> None:
    verifier = _verifier(tmp_path, _jwk(RSA_KEY, "r1", alg="RS256"))
    with pytest.raises(AuthError, match="not accepted"):
        verifier.verify(_token(RSA_KEY, "RS512", "r1"))
    with pytest.raises(AuthError, match="not accepted"):
        verifier.verify(_token(RSA_KEY, "PS256", "r1"))
    # Algorithm confusion: an HS256 token "signed" with the public key as the secret.
    public_pem = _pem(RSA_KEY).encode()
    forged = jwt.api_jws.PyJWS()
    forged._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]
    token = forged.encode(
        json.dumps({"sub": "attacker", "exp": int(time.time()) + 60}).encode(),
        public_pem,
        algorithm="HS256",
        headers={"kid": "r1"},
    )
    with pytest.raises(AuthError, match="not accepted"):
        verifier.verify(token)
    with pytest.raises(AuthError, match="not accepted"):
        verifier.verify(jwt.encode({"sub": "x"}, "", algorithm="none", headers={"kid": "r1"}))


def test_a_token_without_kid_uses_the_only_key_but_not_one_of_several(tmp_path: Path) -> None:
    single = _verifier(tmp_path, _jwk(EC_KEY, "e1"))
    assert single.verify(_token(EC_KEY, "ES256")).user_id == "u-1"
    several = _verifier(tmp_path, _jwk(EC_KEY, "e1"), _jwk(RSA_KEY, "r1"))
    with pytest.raises(AuthError):
        several.verify(_token(EC_KEY, "ES256"))


def test_leeway_comes_from_the_config(tmp_path: Path) -> None:
    expired = _token(RSA_KEY, "RS256", "r1", exp=int(time.time()) - 30)
    strict = _verifier(tmp_path, _jwk(RSA_KEY, "r1"), jwt_leeway=0.0)
    with pytest.raises(AuthError, match="expired"):
        strict.verify(expired)
    lenient = _verifier(tmp_path, _jwk(RSA_KEY, "r1"), jwt_leeway=120.0)
    assert lenient.verify(expired).user_id == "u-1"


def test_audience_and_issuer_apply_to_jwks_tokens(tmp_path: Path) -> None:
    verifier = _verifier(
        tmp_path, _jwk(RSA_KEY, "r1"), jwt_audience="gateway", jwt_issuer="https://id.example"
    )
    good = _token(RSA_KEY, "RS256", "r1", aud="gateway", iss="https://id.example")
    assert verifier.verify(good).user_id == "u-1"
    with pytest.raises(AuthError):
        verifier.verify(_token(RSA_KEY, "RS256", "r1", aud="other", iss="https://id.example"))


def test_a_pem_key_is_pinned_to_its_own_type() -> None:
    rsa_only = TokenVerifier.from_config(Config(jwt_public_key=_pem(RSA_KEY)))
    assert rsa_only.public_key_algorithms == ("RS256",)
    assert rsa_only.verify(_token(RSA_KEY, "RS256")).user_id == "u-1"
    with pytest.raises(AuthError, match="not accepted"):
        rsa_only.verify(_token(EC_KEY, "ES256"))
    ec_only = TokenVerifier.from_config(Config(jwt_public_key=_pem(EC_KEY)))
    assert ec_only.verify(_token(EC_KEY, "ES256")).user_id == "u-1"
    with pytest.raises(AuthError, match="not accepted"):
        ec_only.verify(_token(RSA_KEY, "RS256"))


def test_a_secret_and_a_jwks_work_side_by_side(tmp_path: Path) -> None:
    verifier = _verifier(tmp_path, _jwk(RSA_KEY, "r1"), jwt_secret="s" * 40)
    assert verifier.verify(jwt.encode({"sub": "u-2"}, "s" * 40, algorithm="HS256")).user_id == "u-2"
    assert verifier.verify(_token(RSA_KEY, "RS256", "r1")).user_id == "u-1"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "at least one key"),
        ([{"kty": "RSA"}], "kid"),
        ([{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}], "not accepted"),
        ([{"kty": "RSA", "kid": "r", "alg": "HS256", "n": "AQAB", "e": "AQAB"}], "alg"),
        ([{"kty": "EC", "kid": "e", "alg": "RS256"}], "alg"),
        ([{"kty": "RSA", "kid": "r", "use": "enc", "n": "AQAB", "e": "AQAB"}], "use"),
    ],
)
def test_bad_jwks_documents_are_refused_at_start(keys: list[Any], message: str) -> None:
    with pytest.raises(JwksError, match=message):
        parse_jwks(json.dumps({"keys": keys}))


def test_duplicate_kids_private_keys_and_garbage_are_refused(tmp_path: Path) -> None:
    with pytest.raises(JwksError, match="duplicate"):
        parse_jwks(json.dumps({"keys": [_jwk(RSA_KEY, "a"), _jwk(RSA_OTHER, "a")]}))
    private = RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True)
    private["kid"] = "p"
    with pytest.raises(JwksError, match="private"):
        parse_jwks(json.dumps({"keys": [private]}))
    with pytest.raises(JwksError, match="not JSON"):
        parse_jwks("{")
    path = tmp_path / "big.json"
    path.write_text(" " * 1_100_000)
    with pytest.raises(JwksError, match="larger"):
        load_jwks(str(path))


def test_config_reads_the_new_fields_from_the_environment() -> None:
    config = Config.from_env(
        {"IGRATECH_WS_JWT_JWKS_FILE": "/etc/jwks.json", "IGRATECH_WS_JWT_LEEWAY": "2.5"}
    )
    assert config.jwt_jwks_file == "/etc/jwks.json"
    assert config.jwt_leeway == 2.5
    Config(allow_anonymous=False, jwt_jwks_file="/etc/jwks.json")  # valid: constructs
    with pytest.raises(ValueError, match="jwt_leeway must be a number from 0 to 300, not -1"):
        Config(jwt_leeway=-1)
