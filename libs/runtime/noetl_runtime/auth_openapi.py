"""The security schemes and per-route refusals of the OpenAPI document (noetl_runtime.auth's table)."""
from __future__ import annotations

from typing import Any

from noetl_runtime.auth import OPEN, OPS_ONLY_OPEN, UNSAFE_METHODS, AuthSettings, role_for


def declare_schemes(app: Any, settings: AuthSettings | None) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if getattr(app.state, "auth_openapi_done", False):
            return app.openapi_schema
        schema = generate()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearerAuth"] = {"type": "http", "scheme": "bearer",
                                 "description": "An API token (`noetl token create`) or, when configured, an "
                                                "OIDC access token (JWT)."}
        requirement = [{"bearerAuth": []}]
        if settings is not None and settings.oidc:
            schemes["oidc"] = {"type": "openIdConnect", "openIdConnectUrl":
                               settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"}
            requirement.append({"oidc": []})
        schema["security"] = requirement
        refused = {"description": "Refused", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"detail": {"type": "string"}}}}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                needed = role_for(method.upper(), path)
                if needed == OPEN or (settings is None and (method.upper(), path) in OPS_ONLY_OPEN):
                    operation["security"] = []
                    continue
                operation["x-noetl-role"] = needed
                responses = operation.setdefault("responses", {})
                responses.setdefault("401", {**refused, "description": "No valid credential"})
                responses.setdefault("403", {**refused, "description": f"Needs the role {needed!r}"})
                if method.upper() in UNSAFE_METHODS:
                    responses.setdefault("400", {**refused, "description": "Bad request"})
                    responses.setdefault("415", {**refused, "description": "The body is not JSON"})
        app.state.auth_openapi_done = True
        return schema

    app.openapi = openapi
