"""Dashboard sessions over real HTTP: the cookie is a second credential for the same routes, never the key."""

import httpx
import pytest

from tests.conftest import OPERATOR_KEY, READ_KEY, Api, Fleet

COOKIE = "modelfleet_session"


@pytest.fixture(scope="module")
def api(module_fleet: Fleet) -> Api:
    return module_fleet.api()


def sign_in(api: Api, key: str) -> tuple[httpx.Client, dict]:
    client = httpx.Client(base_url=api.url, timeout=30)
    response = client.post("/api/v1/session", json={"key": key})
    assert response.status_code == 200, response.text
    return client, response.json() | {"set-cookie": response.headers["set-cookie"]}


def test_sign_in_sets_an_httponly_strict_cookie_and_changes_need_the_csrf_token(api: Api) -> None:
    client, session = sign_in(api, OPERATOR_KEY)
    set_cookie = session.pop("set-cookie")
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Secure" not in set_cookie
    assert OPERATOR_KEY not in set_cookie and OPERATOR_KEY not in str(session)
    assert session["scope"] == "operator" and session["canOperate"] is True
    assert client.get("/api/v1/nodes").status_code == 200
    assert client.get("/api/v1/session").json()["csrfToken"] == session["csrfToken"]

    unknown = "/api/v1/nodes/" + "0" * 32 + "/models/unload-all"
    refused = client.post(unknown)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    assert "X-CSRF-Token" in refused.json()["error"]
    assert client.post(unknown, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    passed = client.post(unknown, headers={"X-CSRF-Token": session["csrfToken"]})
    assert passed.status_code == 404 and passed.json()["code"] == "node_not_found"  # through auth, to the route

    # Sign out needs the token too; then the cookie opens nothing.
    assert client.delete("/api/v1/session").status_code == 403
    out = client.delete("/api/v1/session", headers={"X-CSRF-Token": session["csrfToken"]})
    assert out.status_code == 204 and 'modelfleet_session=""' in out.headers["set-cookie"]
    old = httpx.get(api.url + "/api/v1/nodes", cookies={COOKIE: set_cookie.split(";")[0].split("=", 1)[1]})
    assert old.status_code == 401 and "sign in again" in old.json()["error"]


def test_the_cookie_is_secure_when_the_page_came_over_https(api: Api) -> None:
    # Behind a TLS-terminating proxy uvicorn trusts from 127.0.0.1 (its default FORWARDED_ALLOW_IPS), as the
    # README's Dashboard section tells operators to set up.
    with httpx.Client(base_url=api.url, timeout=30) as client:
        response = client.post(
            "/api/v1/session",
            json={"key": OPERATOR_KEY},
            headers={"X-Forwarded-Proto": "https", "Origin": "https://" + api.url.split("://", 1)[1]},
        )
    assert response.status_code == 200, response.text
    set_cookie = response.headers["set-cookie"]
    assert "Secure" in set_cookie and "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie


def test_a_read_only_session_reads_and_is_forbidden_to_change(api: Api) -> None:
    client, session = sign_in(api, READ_KEY)
    assert session["scope"] == "read" and session["canOperate"] is False
    assert client.get("/v1/models").status_code == 200
    refused = client.post("/v1/models/unload-all", headers={"X-CSRF-Token": session["csrfToken"]})
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]


def test_wrong_keys_cross_site_sign_ins_and_forged_cookies_are_refused(api: Api) -> None:
    with httpx.Client(base_url=api.url, timeout=30) as client:
        wrong = client.post("/api/v1/session", json={"key": "not-a-key"})
        assert wrong.status_code == 401 and COOKIE not in wrong.headers.get("set-cookie", "")
        assert client.post("/api/v1/session", json={}).status_code == 422
        other_site = client.post(
            "/api/v1/session", json={"key": OPERATOR_KEY}, headers={"Origin": "https://evil.example"}
        )
        assert other_site.status_code == 403 and COOKIE not in other_site.headers.get("set-cookie", "")
        assert client.get("/api/v1/session").status_code == 401
        client.cookies.set(COOKIE, "A" * 43)
        forged = client.get("/api/v1/nodes")
        assert forged.status_code == 401 and "sign in again" in forged.json()["error"]
    # The Bearer API is unchanged, and the header wins over a cookie.
    with api.client(READ_KEY) as bearer:
        assert bearer.get("/api/v1/nodes").status_code == 200
        bearer.cookies.set(COOKIE, "A" * 43)
        assert bearer.get("/api/v1/nodes").status_code == 200


def test_removing_a_key_ends_its_sessions_and_sessions_outlive_a_restart(module_fleet: Fleet, api: Api) -> None:
    first = api
    client, _ = sign_in(first, OPERATOR_KEY)
    cookie = {COOKIE: client.cookies[COOKIE]}
    same_keys = module_fleet.api()  # another process (or the same one restarted) reads the session from Redis
    assert httpx.get(same_keys.url + "/api/v1/nodes", cookies=cookie).status_code == 200
    rekeyed = module_fleet.api(MODELFLEET_OPERATOR_KEYS="opk-SECRET-another-key")
    ended = httpx.get(rekeyed.url + "/api/v1/nodes", cookies=cookie)
    assert ended.status_code == 401
    assert httpx.get(first.url + "/api/v1/nodes", cookies=cookie).status_code == 401  # ended for every process


def test_the_dashboard_is_served_with_a_strict_policy(api: Api) -> None:
    page = httpx.get(api.url + "/")
    assert page.status_code == 200 and '<script type="module" src="/ui/js/main.js">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    for path in ("/ui/js/main.js", "/ui/js/store.js", "/ui/vendor/lit-html.js", "/ui/app.css", "/ui/favicon.svg"):
        assert httpx.get(api.url + path).status_code == 200, path
    assert "javascript" in httpx.get(api.url + "/ui/js/store.js").headers["content-type"]
    assert httpx.get(api.url + "/ui/%2e%2e/app.py").status_code == 404
