"""Guessing keys against real processes: after 20 wrong keys from one address (bearer headers or dashboard
sign-ins), keys new to that address are refused for a while, at the head and at a node's endpoint; keys that
were right from there before, other addresses, and requests without a key are not concerned
(`broker.wrong_keys`)."""

from pathlib import Path

import httpx

from tests.conftest import ALL_SECRETS, NODE_TOKEN, OPERATOR_KEY, READ_KEY, Fleet


def from_address(url: str, address: str, key: str | None) -> httpx.Client:
    """A client whose connections leave from `address` (any of 127/8 reaches a server on 127.0.0.1)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=url, headers=headers, transport=transport, timeout=30)


def test_twenty_wrong_keys_and_keys_new_to_the_address_are_refused_at_the_head(fleet: Fleet) -> None:
    api = fleet.api()
    schema = httpx.get(api.url + "/openapi.json", timeout=30).json()
    with api.client(READ_KEY) as colleague:  # a client that was working before the guessing started
        assert colleague.get("/api/v1/nodes").status_code == 200
        guesses = [f"guess-{i:04d}" for i in range(20)]
        with httpx.Client(base_url=api.url, timeout=30) as guesser:
            for i, guess in enumerate(guesses):
                if i % 2:  # the dashboard's sign-in counts as much as a bearer header
                    answer = guesser.post("/api/v1/session", json={"key": guess})
                else:
                    answer = guesser.get("/api/v1/nodes", headers={"Authorization": f"Bearer {guess}"})
                assert answer.status_code == 401, (i, answer.text)

            # The right operator key, new to this address, is refused like a wrong one.
            right = guesser.get("/api/v1/nodes", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
            assert right.status_code == 429, right.text
            body = right.json()
            assert body["code"] == "too_many_wrong_keys" and "Try again in 3 s" in body["error"]
            assert right.headers["retry-after"] == "3"
            assert guesser.post("/api/v1/session", json={"key": OPERATOR_KEY}).status_code == 429
            prompt = {"model": "m", "prompt": "Once upon a time"}
            wrong = guesser.post("/v1/completions", json=prompt, headers={"Authorization": "Bearer guess-x"})
            assert wrong.status_code == 429 and wrong.json()["error"]["code"] == "too_many_wrong_keys"
            # No key at all guesses nothing: told how to send one, as ever.
            assert guesser.get("/api/v1/nodes").status_code == 401

        # The key that was right from here before goes on working, and so does another address.
        assert colleague.get("/api/v1/nodes").status_code == 200
        metrics = colleague.get("/metrics").text
        assert 'modelfleet_wrong_keys_total{outcome="wrong"} 20.0' in metrics
        assert 'modelfleet_wrong_keys_total{outcome="refused"} 3.0' in metrics
        with from_address(api.url, "127.0.0.2", OPERATOR_KEY) as neighbour:
            assert neighbour.get("/api/v1/nodes").status_code == 200

    # The schema says so on every route that takes a key, and on the sign-in only among the session's routes.
    responses = schema["paths"]["/api/v1/nodes"]["get"]["responses"]
    assert "too_many_wrong_keys" in responses["429"]["description"]
    assert "Retry-After" in responses["429"]["headers"]
    assert "429" in schema["paths"]["/api/v1/session"]["post"]["responses"]
    assert "429" not in schema["paths"]["/api/v1/session"]["get"]["responses"]

    log = api.log()
    assert "127.0.0.1 sent 20 wrong keys within 60 s" in log
    assert "127.0.0.2 sent" not in log
    for secret in [*guesses, *ALL_SECRETS]:
        assert secret not in log


def test_a_nodes_endpoint_counts_wrong_keys_too(fleet: Fleet, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    node = fleet.worker("guarded", models)
    with node.inference(NODE_TOKEN) as head:  # the head's token, right from this address before the guessing
        assert head.get("/v1/models").status_code == 200
        with node.inference(None) as guesser:
            for i in range(20):  # naming another address for each: a node takes no proxy's word for it
                headers = {"Authorization": f"Bearer guess-{i}", "X-Forwarded-For": f"10.9.0.{i}"}
                assert guesser.get("/v1/models", headers=headers).status_code == 401
            refused = guesser.get("/v1/models", headers={"Authorization": f"Bearer {READ_KEY}"})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
            assert refused.json()["error"]["code"] == "too_many_wrong_keys"  # OpenAI's shape, as every node error
        assert head.get("/v1/models").status_code == 200
    assert "127.0.0.1 sent 20 wrong keys within 60 s" in node.log()


def test_the_limit_can_be_turned_off(fleet: Fleet) -> None:
    api = fleet.api(MODELFLEET_WRONG_KEY_LIMIT="0")
    with httpx.Client(base_url=api.url, timeout=30) as guesser:
        for i in range(30):
            answer = guesser.get("/api/v1/nodes", headers={"Authorization": f"Bearer guess-{i}"})
            assert answer.status_code == 401
        assert guesser.get("/api/v1/nodes", headers={"Authorization": f"Bearer {READ_KEY}"}).status_code == 200
