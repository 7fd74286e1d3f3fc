"""OIDC access tokens (JWTs) for clusters with single sign-on (docs/security.md "OIDC"), verified with PyJWT.

    NOETL_OIDC_ISSUER       the `iss` the tokens must carry
    NOETL_OIDC_AUDIENCE     the `aud` they must carry (the client id or API identifier given to noetl)
    NOETL_OIDC_JWKS_URL     where the provider publishes its signing keys (fetched, cached, refetched on an
                            unknown `kid`)
    NOETL_OIDC_ROLES_CLAIM  the claim holding the roles (a string or a list; dotted for nested claims,
                            e.g. realm_access.roles); each value is a role name or is mapped to one by
                            NOETL_OIDC_ROLE_MAP ({"noetl-admins": "admin"}); the highest role wins

Only asymmetric algorithms are accepted (a JWKS publishes public keys; accepting HS256 would let anyone
who knows a public key sign tokens). `exp`, `iss`, `aud` and `sub` are required; 30 s of clock skew.
"""
from __future__ import annotations

import asyncio
from typing import Any

import jwt
from jwt import PyJWKClient

from noetl_runtime.auth import _RANK, WORKER, AuthError, AuthSettings, Principal

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
LEEWAY = 30


class OidcVerifier:
    def __init__(self, settings: AuthSettings, refetch_cooldown: float = 30.0) -> None:
        self.settings = settings
        # The JWKS is cached (5 min) and refetched when a token names a key id it does not know (rotation),
        # at most once per `refetch_cooldown` seconds: tokens with made-up key ids cannot hammer the provider.
        self.keys = PyJWKClient(settings.oidc_jwks_url or "", cache_keys=True, lifespan=300, timeout=10,
                                cooldown_duration=refetch_cooldown)

    async def principal(self, token: str) -> Principal:
        # PyJWKClient fetches with urllib (blocking): off the event loop
        claims = await asyncio.to_thread(self.verify, token)
        subject = claims.get("preferred_username") or claims.get("email") or claims["sub"]
        return Principal(f"oidc:{str(subject)[:200]}", self.role(claims))

    def verify(self, token: str) -> dict[str, Any]:
        try:
            key = self.keys.get_signing_key_from_jwt(token)
            return jwt.decode(token, key.key, algorithms=ALGORITHMS, audience=self.settings.oidc_audience,
                              issuer=self.settings.oidc_issuer, leeway=LEEWAY,
                              options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "the token has expired") from None
        except jwt.PyJWKClientConnectionError as exc:
            raise AuthError(401, f"the identity provider's keys cannot be fetched: {exc}") from None
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, UnicodeError):
            raise AuthError(401, "invalid token") from None

    def role(self, claims: dict[str, Any]) -> str | None:
        value: Any = claims
        for part in self.settings.oidc_roles_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        roles = {self.settings.oidc_role_map.get(v, v) for v in values if isinstance(v, str)}
        ranked = [r for r in roles if r in _RANK]
        if ranked:
            return max(ranked, key=_RANK.__getitem__)
        return WORKER if WORKER in roles else None

