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
