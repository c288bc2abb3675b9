"""Configuration from the environment, its validation, and JWT verification (HS256, RS256, ES256,
algorithm confusion, time claims with leeway, audience, issuer, subject)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from igratech_ws.auth import ANONYMOUS, AuthError, Principal, TokenVerifier, mint_token
from igratech_ws.config import Config, ConfigError

SECRET = "a-test-secret-that-is-long-enough-for-hs256"

# --- Config.from_env --------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    assert Config.from_env({}) == Config()


def test_from_env_parses_each_type() -> None:
    config = Config.from_env(
        {
            "IGRATECH_WS_PORT": "9000",
            "IGRATECH_WS_HOST": "127.0.0.1",
            "IGRATECH_WS_HISTORY_TTL": "12.5",
            "IGRATECH_WS_ALLOW_ANONYMOUS": "no",
            "IGRATECH_WS_DEMO": "ON",
            "IGRATECH_WS_NODE_ID": "node-7",
            "IGRATECH_WS_BROKER": "redis://127.0.0.1:6379/0",
            "IGRATECH_WS_JWT_SECRET": SECRET,
            "UNRELATED": "x",
        }
    )
    assert config.port == 9000
    assert config.host == "127.0.0.1"
    assert config.history_ttl == 12.5 and isinstance(config.history_ttl, float)
    assert config.allow_anonymous is False
    assert config.demo is True
    assert config.node_id == "node-7"
    assert config.broker == "redis://127.0.0.1:6379/0"
    assert config.jwt_secret == SECRET
    assert config.api_port == 8081  # untouched default


@pytest.mark.parametrize("raw", ["1", "true", "YES", " on "])
def test_true_words(raw: str) -> None:
    assert Config.from_env({"IGRATECH_WS_DEMO": raw}).demo is True


@pytest.mark.parametrize("raw", ["0", "False", "no", "off"])
def test_false_words(raw: str) -> None:
    env = {"IGRATECH_WS_ALLOW_ANONYMOUS": raw, "IGRATECH_WS_JWT_SECRET": SECRET}
    assert Config.from_env(env).allow_anonymous is False


@pytest.mark.parametrize(
    ("variable", "raw", "words"),
    [
        ("IGRATECH_WS_PORT", "eighty", "integer"),
        ("IGRATECH_WS_PORT", "", "integer"),
        ("IGRATECH_WS_PORT", "80.5", "integer"),
        ("IGRATECH_WS_HISTORY_TTL", "soon", "number"),
        ("IGRATECH_WS_DEMO", "maybe", "true or false"),
    ],
)
def test_from_env_errors_name_the_variable(variable: str, raw: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        Config.from_env({variable: raw})
    message = str(caught.value)
    assert variable in message
    assert words in message
    assert repr(raw) in message


def test_secrets_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n", encoding="utf-8")
    key = tmp_path / "api"
    key.write_text("api-key-1", encoding="utf-8")
    config = Config.from_env(
        {"IGRATECH_WS_JWT_SECRET_FILE": str(secret), "IGRATECH_WS_API_KEY_FILE": str(key)}
    )
    assert config.jwt_secret == SECRET
    assert config.api_key == "api-key-1"


def test_the_variable_wins_over_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file", encoding="utf-8")
    config = Config.from_env(
        {"IGRATECH_WS_JWT_SECRET": "from-env", "IGRATECH_WS_JWT_SECRET_FILE": str(secret)}
    )
    assert config.jwt_secret == "from-env"


def test_file_variables_are_only_for_secrets(tmp_path: Path) -> None:
    port = tmp_path / "port"
    port.write_text("9999", encoding="utf-8")
    assert Config.from_env({"IGRATECH_WS_PORT_FILE": str(port)}).port == 8080


def test_secrets_stay_out_of_repr() -> None:
    text = repr(Config(jwt_secret=SECRET, api_key="the-api-key", jwt_public_key="PEM"))
    assert SECRET not in text and "the-api-key" not in text and "PEM" not in text


# --- with_overrides and validate --------------------------------------------------------------


def test_with_overrides_applies_non_none_values() -> None:
    base = Config(port=1234)
    changed = base.with_overrides({"port": None, "host": "127.0.0.1", "idle_timeout": 90})
    assert (changed.port, changed.host, changed.idle_timeout) == (1234, "127.0.0.1", 90)
    assert base.host == "0.0.0.0"  # frozen: a copy


def test_with_overrides_refuses_unknown_settings() -> None:
    with pytest.raises(ConfigError, match="unknown settings: bogus, port_number"):
        Config().with_overrides({"port_number": 1, "bogus": 2, "port": 3})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"port": 70000}, "port must be an integer from 0 to 65535, not 70000"),
        ({"api_port": -1}, "api_port must be an integer from 0 to 65535, not -1"),
        ({"port": "80"}, "port must be an integer from 0 to 65535, not '80'"),
        (
            {"idle_timeout": 25, "ping_interval": 25},
            "idle_timeout (25) must be greater than ping_interval (25)",
        ),
        ({"ping_interval": 0}, "ping_interval must be a positive integer, not 0"),
        ({"allow_anonymous": False}, "allow_anonymous is off"),
        ({"history_size": 0}, "history_size must be a positive integer, not 0"),
        ({"max_frame_bytes": -5}, "max_frame_bytes must be a positive integer, not -5"),
        ({"max_games_per_connection": 0}, "max_games_per_connection must be a positive integer"),
        ({"max_batch_items": 0}, "max_batch_items must be a positive integer"),
        ({"history_ttl": 0.0}, "history_ttl must be a positive number, not 0.0"),
        ({"history_ttl": math.inf}, "history_ttl must be a positive number, not inf"),
        ({"max_message_rate": math.nan}, "max_message_rate must be a positive number, not nan"),
        ({"message_burst": 0.5}, "message_burst must be a number of at least 1, not 0.5"),
        ({"max_flush_delay": 2}, "max_flush_delay must be a number from 0 to 1, not 2"),
        ({"log_level": "loud"}, "log_level must be one of debug, info, warning, error"),
        ({"demo": "yes"}, "demo must be true or false, not 'yes'"),
        ({"trusted_proxies": "10.0.0.1/8"}, "trusted_proxies: '10.0.0.1/8' has host bits set"),
    ],
)
def test_an_invalid_config_cannot_be_made(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config().with_overrides(overrides)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(expected)
    with pytest.raises(ConfigError):
        Config(**overrides)  # the constructor checks the same


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Config(port=-1, api_port=70000, history_size=0)
    assert len(caught.value.problems) == 3


def test_anonymous_off_is_valid_with_a_secret_or_a_key() -> None:
    Config(allow_anonymous=False, jwt_secret=SECRET)
    Config(allow_anonymous=False, jwt_public_key="PEM")


def test_nan_history_ttl_is_refused() -> None:
    with pytest.raises(ConfigError, match="IGRATECH_WS_HISTORY_TTL must be a positive number"):
        Config.from_env({"IGRATECH_WS_HISTORY_TTL": "nan"})


# --- tokens -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "u-42", "iat": now, "exp": now + 600, **extra}


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def forged_hs256(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed by hand (PyJWT refuses to use a PEM key as an HMAC secret)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    signature = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token)
    return str(caught.value)


def test_hs256_ok() -> None:
    payload = claims()
    principal = TokenVerifier(secret=SECRET).verify(hs256(payload))
    assert principal == Principal("u-42", float(payload["exp"]))


def test_token_without_exp_never_expires() -> None:
    assert TokenVerifier(secret=SECRET).verify(hs256({"sub": "u-1"})) == Principal("u-1", None)


def test_mint_token_round_trip() -> None:
    token = mint_token(SECRET, "u-7", ttl=60, audience="aud", issuer="iss")
    principal = TokenVerifier(secret=SECRET, audience="aud", issuer="iss").verify(token)
    assert principal.user_id == "u-7"
    assert principal.expires_at is not None
    assert 0 < principal.expires_at - time.time() <= 61


def test_wrong_secret() -> None:
    assert "invalid token" in refused(TokenVerifier(secret=SECRET), hs256(claims(), SECRET + "x"))


def test_tampered_payload() -> None:
    header, _, signature = hs256(claims()).split(".")
    body = _b64(json.dumps(claims(sub="u-admin")).encode())
    assert refused(TokenVerifier(secret=SECRET), f"{header}.{body}.{signature}")


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "e30.e30"])
def test_malformed_tokens(token: str) -> None:
    assert refused(TokenVerifier(secret=SECRET), token)


def test_alg_none_is_refused() -> None:
    header = _b64(b'{"alg":"none","typ":"JWT"}')
    token = f"{header}.{_b64(json.dumps(claims()).encode())}."
    assert "not accepted" in refused(TokenVerifier(secret=SECRET), token)


def test_no_key_configured() -> None:
    verifier = TokenVerifier()
    assert not verifier.enabled
    assert "not configured" in refused(verifier, hs256(claims()))
    assert Principal(None, None) == ANONYMOUS


def test_rs256_ok(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    verifier = TokenVerifier(public_key=public_pem(rsa_key))
    assert verifier.verify(token).user_id == "u-42"


def test_es256_ok(ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    verifier = TokenVerifier(public_key=public_pem(ec_key))
    assert verifier.verify(token).user_id == "u-42"


def test_from_config_with_a_public_key(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rs = TokenVerifier.from_config(Config(jwt_public_key=public_pem(rsa_key)))
    assert rs.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")).user_id == "u-42"
    es = TokenVerifier.from_config(Config(jwt_public_key=public_pem(ec_key)))
    assert es.verify(jwt.encode(claims(), ec_key, algorithm="ES256")).user_id == "u-42"
    # each PEM key verifies its own algorithm only
    assert refused(rs, jwt.encode(claims(), ec_key, algorithm="ES256"))


def test_signature_by_another_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256")
    assert "invalid token" in refused(TokenVerifier(public_key=public_pem(rsa_key)), token)


def test_algorithm_confusion_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """An HS256 token 'signed' with the public key PEM must not pass a public-key verifier."""
    pem = public_pem(rsa_key)
    token = forged_hs256(claims(), pem.encode())
    assert "not accepted" in refused(TokenVerifier(public_key=pem), token)
    # with a secret configured too, HS256 is checked against the secret, never the PEM
    assert refused(TokenVerifier(secret=SECRET, public_key=pem), token)


def test_rs256_token_is_refused_by_a_secret_only_verifier(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert "not accepted" in refused(TokenVerifier(secret=SECRET), token)


def test_expired() -> None:
    token = hs256(claims(exp=int(time.time()) - 60))
    assert refused(TokenVerifier(secret=SECRET, leeway=5), token) == "token expired"


def test_expired_within_leeway_is_accepted() -> None:
    token = hs256(claims(exp=int(time.time()) - 30))
    assert TokenVerifier(secret=SECRET, leeway=120).verify(token).user_id == "u-42"
    assert refused(TokenVerifier(secret=SECRET, leeway=5), token) == "token expired"


def test_not_yet_valid() -> None:
    token = hs256(claims(nbf=int(time.time()) + 600))
    assert "invalid token" in refused(TokenVerifier(secret=SECRET, leeway=5), token)


def test_nbf_within_leeway_is_accepted() -> None:
    token = hs256(claims(nbf=int(time.time()) + 30))
    assert TokenVerifier(secret=SECRET, leeway=120).verify(token).user_id == "u-42"
    assert refused(TokenVerifier(secret=SECRET, leeway=0), token)


def test_audience() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="igratech")
    assert verifier.verify(hs256(claims(aud="igratech"))).user_id == "u-42"
    assert verifier.verify(hs256(claims(aud=["other", "igratech"]))).user_id == "u-42"
    assert refused(verifier, hs256(claims(aud="other")))
    assert refused(verifier, hs256(claims()))  # missing aud
    # without a configured audience, a token's aud is not checked
    assert TokenVerifier(secret=SECRET).verify(hs256(claims(aud="any"))).user_id == "u-42"


def test_issuer() -> None:
    verifier = TokenVerifier(secret=SECRET, issuer="https://login.example")
    assert verifier.verify(hs256(claims(iss="https://login.example"))).user_id == "u-42"
    assert refused(verifier, hs256(claims(iss="https://evil.example")))
    assert refused(verifier, hs256(claims()))  # missing iss


@pytest.mark.parametrize("sub", ["", "bad id", "-u", "x" * 65, "u/1"])
def test_bad_sub(sub: str) -> None:
    message = refused(TokenVerifier(secret=SECRET), hs256(claims(sub=sub)))
    assert "sub" in message or "invalid token" in message


@pytest.mark.parametrize("sub", [42, None, ["u-1"]])
def test_sub_must_be_a_string(sub: Any) -> None:
    assert refused(TokenVerifier(secret=SECRET), hs256(claims(sub=sub)))


def test_missing_sub() -> None:
    payload = claims()
    del payload["sub"]
    assert "sub" in refused(TokenVerifier(secret=SECRET), hs256(payload))
