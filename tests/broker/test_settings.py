"""The fleet's keys, declared once (`broker.settings.KeyedSettings`) for both processes that check them."""

import pytest

from api.settings import ApiSettings
from broker.settings import BrokerSettings, KeyedSettings
from workers.settings import WorkerSettings


@pytest.mark.parametrize("kind", [ApiSettings, WorkerSettings])
def test_the_head_and_the_node_read_comma_separated_keys_from_the_environment(
    kind: type[KeyedSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELFLEET_OPERATOR_KEYS", " op-SECRET-1, op-SECRET-2 ,")
    monkeypatch.setenv("MODELFLEET_API_KEYS", "ro-SECRET-1")
    settings = kind()
    assert isinstance(settings, KeyedSettings)
    assert [k.get_secret_value() for k in settings.operator_keys] == ["op-SECRET-1", "op-SECRET-2"]
    assert [k.get_secret_value() for k in settings.api_keys] == ["ro-SECRET-1"]
    assert "SECRET" not in repr(settings)
    assert kind(operator_keys=[], api_keys=["a"]).api_keys[0].get_secret_value() == "a"  # a list as it is


def test_the_node_still_splits_its_preload_and_processes_without_keys_have_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELFLEET_PRELOAD", "tiny-a, org/nested")
    monkeypatch.setenv("MODELFLEET_OPERATOR_KEYS", "op-SECRET-1")
    assert WorkerSettings().preload == ["tiny-a", "org/nested"]
    assert not hasattr(BrokerSettings(), "operator_keys")  # Flower's settings, say: no keys


@pytest.mark.parametrize("kind", [ApiSettings, WorkerSettings])
def test_short_keys_are_warned_about_by_where_and_length_never_shown(kind: type[KeyedSettings]) -> None:
    settings = kind(operator_keys=["op-SECRET-1"], api_keys=["ro-SECRET-long-enough-1"], node_token="nt-SECRET")
    warnings = settings.short_secrets()
    assert [w.split(" holds")[0] for w in warnings] == ["MODELFLEET_NODE_TOKEN", "MODELFLEET_OPERATOR_KEYS"]
    assert "9 characters" in warnings[0] and "11 characters" in warnings[1]
    assert not any("SECRET" in w for w in warnings)
    assert kind(operator_keys=["x" * 16]).short_secrets() == []
