"""Guessing keys against a real API process: after 20 wrong keys from one address (a bearer header or a
dashboard sign-in), no key from it is checked for a while; other addresses, and requests without a key, are
not concerned (`api.wrong_keys`)."""

import httpx

from tests.conftest import ALL_SECRETS, OPERATOR_KEY, READ_KEY, Fleet


def from_address(url: str, address: str, key: str | None) -> httpx.Client:
    """A client whose connections leave from `address` (any of 127/8 reaches the API on loopback)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=url, headers=headers, transport=transport, timeout=30)


def test_twenty_wrong_keys_and_the_address_is_refused_even_its_right_key(fleet: Fleet) -> None:
    api = fleet.api()
    schema = httpx.get(api.url + "/openapi.json", timeout=30).json()
    guesses = [f"guess-{i:04d}" for i in range(20)]
    with httpx.Client(base_url=api.url, timeout=30) as guesser:
        for i, guess in enumerate(guesses):
            if i % 2:  # the dashboard's sign-in counts as much as a bearer header
                answer = guesser.post("/api/v1/session", json={"key": guess})
            else:
                answer = guesser.get("/api/v1/nodes", headers={"Authorization": f"Bearer {guess}"})
            assert answer.status_code == 401, (i, answer.text)

        right = guesser.get("/api/v1/nodes", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
        assert right.status_code == 429, right.text
        body = right.json()
        assert body["code"] == "too_many_wrong_keys" and "Try again in 3 s" in body["error"]
        assert right.headers["retry-after"] == "3"
        assert guesser.post("/api/v1/session", json={"key": OPERATOR_KEY}).status_code == 429
        prompt = {"model": "m", "prompt": "Once upon a time"}
        inference = guesser.post("/v1/completions", json=prompt, headers={"Authorization": f"Bearer {READ_KEY}"})
        assert inference.status_code == 429 and inference.json()["error"]["code"] == "too_many_wrong_keys"
        # No key at all guesses nothing: told how to send one, as ever.
        assert guesser.get("/api/v1/nodes").status_code == 401

    # The schema says so for every route that takes a key.
    responses = schema["paths"]["/api/v1/nodes"]["get"]["responses"]
    assert "too_many_wrong_keys" in responses["429"]["description"]
    assert "Retry-After" in responses["429"]["headers"]
    assert "429" in schema["paths"]["/api/v1/session"]["post"]["responses"]

    with from_address(api.url, "127.0.0.2", READ_KEY) as neighbour:
        assert neighbour.get("/api/v1/nodes").status_code == 200

    log = api.log()
    assert "127.0.0.1 sent 20 wrong API keys within 60 s" in log
    assert "127.0.0.2 sent" not in log
    for secret in [*guesses, *ALL_SECRETS]:
        assert secret not in log


def test_the_limit_can_be_turned_off(fleet: Fleet) -> None:
    api = fleet.api(MODELFLEET_WRONG_KEY_LIMIT="0")
    with httpx.Client(base_url=api.url, timeout=30) as guesser:
        for i in range(30):
            answer = guesser.get("/api/v1/nodes", headers={"Authorization": f"Bearer guess-{i}"})
            assert answer.status_code == 401
        assert guesser.get("/api/v1/nodes", headers={"Authorization": f"Bearer {READ_KEY}"}).status_code == 200
