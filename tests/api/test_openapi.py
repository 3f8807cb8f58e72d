"""The OpenAPI schema names both credentials as alternatives, and the dashboard's session routes with their errors."""

from pydantic import SecretStr

from api.app import create_app
from api.settings import ApiSettings


def schema() -> dict:
    return create_app(ApiSettings(operator_keys=[SecretStr("k")])).openapi()


def test_every_route_accepts_a_bearer_key_or_the_session_cookie() -> None:
    spec = schema()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["type"] == "http" and schemes["HTTPBearer"]["scheme"] == "bearer"
    assert {k: schemes["APIKeyCookie"][k] for k in ("type", "in", "name")} == {
        "type": "apiKey",
        "in": "cookie",
        "name": "modelfleet_session",
    }
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if path in ("/healthz",) or path.startswith("/api/v1/session"):
                continue
            assert operation["security"] == [{"HTTPBearer": []}, {"APIKeyCookie": []}], (method, path)
            assert "authorization" not in [p["name"].lower() for p in operation.get("parameters", [])]


def test_session_routes_are_typed_with_their_errors() -> None:
    paths = schema()["paths"]
    assert "/" not in paths and not any(p.startswith("/ui") for p in paths)
    sign_in = paths["/api/v1/session"]["post"]
    assert set(sign_in["responses"]) >= {"200", "401", "403", "422"}
    assert sign_in["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SessionInfo")
    assert paths["/api/v1/nodes/{fingerprint}/catalog"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]["$ref"].endswith("/NodeCatalog")
