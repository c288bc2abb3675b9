"""A token whose `exp` is not a number is refused on every key type (issue 9, item 7).

On main an RS256/ES256/JWKS token with ``"exp": "<digits>"`` passed PyJWT (which takes
`int(exp)`) and its connection never expired (the node enforces `exp` only when it is a number),
while the HS256 fast path refused the same token. A connection's enforced expiry is the `exp`
that was verified; a number too large for a float is refused rather than crashing (500).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from igratech_ws.app import running_app
from tests.support.gateway import SECRET, base_config, recv_event

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(private: Any) -> str:
    encoded: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encoded.decode()


def _token(algorithm: str, claims: dict[str, Any]) -> str:
    key: Any = {"HS256": SECRET, "ES256": EC_KEY, "RS256": RSA_KEY}[algorithm]
    headers = {"kid": "r1"} if algorithm == "RS256" else None
    # PyJWS signs the claims as given (jwt.encode would refuse some of them).
    return jwt.PyJWS().encode(
        json.dumps(claims).encode(), key, algorithm=algorithm, headers=headers
    )


@pytest.fixture
def jwks_file(tmp_path: Path) -> str:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True)
    jwk.update(kid="r1", alg="RS256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return str(path)


@pytest.mark.parametrize("algorithm", ["HS256", "ES256", "RS256"])
@pytest.mark.parametrize(
    "exp",
    [
        pytest.param(lambda now: str(now + 3600), id="numeric-string"),
        pytest.param(lambda now: str(now - 3600), id="expired-numeric-string"),
        pytest.param(lambda now: True, id="boolean"),
        pytest.param(lambda now: 10**400, id="overflowing-integer"),
    ],
)
async def test_a_token_whose_exp_is_not_a_usable_number_is_refused(
    algorithm: str, exp: Any, jwks_file: str
) -> None:
    config = base_config(jwt_public_key=_pem(EC_KEY), jwt_jwks_file=jwks_file)
    now = int(time.time())
    token = _token(algorithm, {"sub": "u-1", "iat": now, "exp": exp(now)})
    async with running_app(config) as app:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"{app.ws_url}?token={token}", open_timeout=5):
                pass
        assert refused.value.response.status_code == 401
        # The same user with a proper `exp` connects and carries that expiry.
        good = _token(algorithm, {"sub": "u-1", "iat": now, "exp": now + 3600})
        async with websockets.connect(f"{app.ws_url}?token={good}", open_timeout=5) as ws:
            await recv_event(ws, "connected")
            (connection,) = app.node._connections
            assert connection.expires_at == now + 3600
