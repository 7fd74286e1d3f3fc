"""OIDC access tokens (JWTs), verified for real: keys generated here, the JWKS served by a local HTTP server,
tokens signed with PyJWT, checked by the real Authenticator inside the real `noetl server` app.
Nothing of the verifier is replaced."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from noetl_runtime.auth import Authenticator, AuthSettings
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.tokens import SqliteTokens

ISSUER = "https://idp.example.test/realms/noetl"
AUDIENCE = "noetl-api"


class Jwks:
    """A JWKS endpoint on 127.0.0.1 whose key set the test can change (key rotation)."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:   # noqa: N802 - the http.server API
                jwks.fetches += 1
                body = json.dumps({"keys": jwks.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/protocol/openid-connect/certs"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, kid: str, public_key: Any, algorithm: Any = RSAAlgorithm) -> None:
        jwk = json.loads(algorithm.to_jwk(public_key))
        self.keys.append({**jwk, "kid": kid, "use": "sig"})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks() -> Iterator[Jwks]:
    server = Jwks()
    yield server
    server.close()


@pytest.fixture
def rsa_key(jwks: Jwks) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.publish("k1", key.public_key())
    return key


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "noetl.db")
    yield s
    s.close()


def settings(jwks: Jwks, **extra: Any) -> AuthSettings:
    return AuthSettings(oidc_issuer=ISSUER, oidc_audience=AUDIENCE, oidc_jwks_url=jwks.url, **extra)


def sign(key: Any, kid: str = "k1", algorithm: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-1", "preferred_username": "alice", "iat": now,
            "exp": now + 300, "roles": ["operator"], **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm,
                      headers={"kid": kid})


def app_with(store: SqliteStore, auth: Authenticator) -> Any:
    from noetl_cli.server import build_app
    from noetl_embedded.runtime import EmbeddedRuntime

    return build_app(store, EmbeddedRuntime(store), auth=auth)


async def status(app: Any, token: str, method: str = "GET", path: str = "/api/executions") -> int:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        kwargs = {"json": {}} if method == "POST" else {}
        return (await client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)).status_code


async def test_a_valid_token_maps_its_roles_claim_to_a_role(jwks: Jwks, rsa_key: Any, store: SqliteStore) -> None:
    auth = Authenticator(SqliteTokens(store), settings=settings(jwks))
    principal = await auth.authenticate(f"Bearer {sign(rsa_key)}")
    assert (principal.name, principal.role) == ("oidc:alice", "operator")
    app = app_with(store, auth)
    assert await status(app, sign(rsa_key)) == 200
    assert await status(app, sign(rsa_key), "POST", "/api/catalog/register") == 403     # an author's route
    assert await status(app, sign(rsa_key, roles=["viewer", "author"]), "POST", "/api/catalog/register") == 422
    assert await status(app, sign(rsa_key, roles=None)) == 403                # signed in, but given no role
    assert await status(app, sign(rsa_key, roles="admin"), "GET", "/api/credentials") == 200   # a string claim


async def test_a_nested_claim_and_a_role_map(jwks: Jwks, rsa_key: Any, store: SqliteStore) -> None:
    auth = Authenticator(None, settings=settings(jwks, oidc_roles_claim="realm_access.roles",
                                                 oidc_role_map={"noetl-admins": "admin", "ops": "operator"}))
    token = sign(rsa_key, roles=None, realm_access={"roles": ["offline_access", "ops", "noetl-admins"]})
    assert (await auth.authenticate(f"Bearer {token}")).role == "admin"       # the highest wins
    token = sign(rsa_key, roles=None, realm_access={"roles": ["worker"]})
    assert (await auth.authenticate(f"Bearer {token}")).role == "worker"
    token = sign(rsa_key, roles=None, realm_access="not a mapping")
    assert (await auth.authenticate(f"Bearer {token}")).role is None
    with pytest.raises(ValueError):
        AuthSettings(oidc_role_map={"x": "superuser"})


async def test_every_bad_token_is_401(jwks: Jwks, rsa_key: Any, store: SqliteStore) -> None:
    app = app_with(store, Authenticator(SqliteTokens(store), settings=settings(jwks)))
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    bad = {
        "wrong audience": sign(rsa_key, aud="another-api"),
        "wrong issuer": sign(rsa_key, iss="https://evil.example"),
        "expired": sign(rsa_key, exp=now - 120),
        "not yet valid": sign(rsa_key, nbf=now + 600),
        "no exp": sign(rsa_key, exp=None),
        "no sub": sign(rsa_key, sub=None),
        "another key, same kid": sign(other_key),
        "unknown kid": sign(other_key, kid="k9"),
        # the classic confusion: HMAC keyed with the provider's public key
        "HS256 with the public key": _hmac_signed({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 300,
                                                   "roles": ["admin"]}, public_pem),
        "alg none": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 300, "roles": ["admin"]},
                               None, algorithm="none", headers={"kid": "k1"}),
        "garbage": "eyJhbGciOiJSUzI1NiJ9.e30.AAAA",
        "not base64": "a.b.c",
        "tampered payload": _tamper(sign(rsa_key, roles=["viewer"])),
    }
    for what, token in bad.items():
        assert await status(app, token) == 401, what


async def test_keys_rotate_and_an_unreachable_provider_is_401(jwks: Jwks, rsa_key: Any, store: SqliteStore) -> None:
    from noetl_runtime.oidc import OidcVerifier

    # no refetch cooldown here (30 s by default), so the rotation is picked up at the next unknown kid
    auth = Authenticator(None, settings=settings(jwks), oidc=OidcVerifier(settings(jwks), refetch_cooldown=0))
    assert (await auth.authenticate(f"Bearer {sign(rsa_key)}")).role == "operator"
    fetched = jwks.fetches
    for _ in range(3):   # a known kid: served from the cache
        await auth.authenticate(f"Bearer {sign(rsa_key)}")
    assert jwks.fetches == fetched
    new_key = ec.generate_private_key(ec.SECP256R1())
    jwks.publish("k2", new_key.public_key(), ECAlgorithm)         # the provider rotates to an EC key
    rotated = sign(new_key, kid="k2", algorithm="ES256", roles=["viewer"])
    assert (await auth.authenticate(f"Bearer {rotated}")).role == "viewer"   # refetched on the unknown kid
    down = Authenticator(None, settings=AuthSettings(oidc_issuer=ISSUER, oidc_audience=AUDIENCE,
                                                     oidc_jwks_url="http://127.0.0.1:9/certs"))
    app = app_with(store, down)
    assert await status(app, sign(rsa_key)) == 401


def test_oidc_needs_all_three_settings_and_is_declared_in_openapi(jwks: Jwks, store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="NOETL_OIDC_ISSUER"):
        Authenticator(None, settings=AuthSettings(oidc_issuer=ISSUER))
    schema = app_with(store, Authenticator(None, settings=settings(jwks))).openapi()
    assert schema["components"]["securitySchemes"]["oidc"] == {
        "type": "openIdConnect", "openIdConnectUrl": f"{ISSUER}/.well-known/openid-configuration"}
    assert schema["security"] == [{"bearerAuth": []}, {"oidc": []}]


def _tamper(token: str) -> str:
    import base64

    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{head}.{forged}.{signature}"


def _hmac_signed(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT built by hand (PyJWT itself refuses to HMAC with a PEM key): the algorithm-confusion
    attack, where the provider's public key is used as the HMAC secret."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode()) + "." + \
        b64(json.dumps(claims).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())
