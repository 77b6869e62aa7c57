"""Settings from STEPLINE_* variables: defaults, parsing, pointed errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepline.common.auth import Authenticator, Principal
from stepline.common.config import ClientSettings, Env, NatsSettings, ServerSettings
from stepline.common.errors import ConfigError, Unauthenticated


def test_server_settings_defaults_and_overrides() -> None:
    assert ServerSettings.from_env(Env({}), service="ledger").listen == "127.0.0.1:0"
    settings = ServerSettings.from_env(
        Env({"STEPLINE_LISTEN": "0.0.0.0:7000", "STEPLINE_LOG_FORMAT": "json"}), service="x"
    )
    assert settings.listen == "0.0.0.0:7000"
    assert settings.log_json


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"STEPLINE_LISTEN": "nowhere"}, "STEPLINE_LISTEN must be host:port"),
        ({"STEPLINE_LISTEN": "h:99999"}, "0-65535"),
        ({"STEPLINE_MAX_MESSAGE_BYTES": "lots"}, "STEPLINE_MAX_MESSAGE_BYTES must be an integer"),
        ({"STEPLINE_MAX_MESSAGE_BYTES": "10"}, "at least 1024"),
        ({"STEPLINE_LOG_LEVEL": "loud"}, "STEPLINE_LOG_LEVEL must be one of"),
    ],
)
def test_bad_values_name_the_variable(variables: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerSettings.from_env(Env(variables), service="x")


def test_a_bad_stream_prefix_is_a_configuration_error() -> None:
    env = Env({"STEPLINE_NATS_URL": "nats://127.0.0.1:4222", "STEPLINE_STREAM_PREFIX": "a.b"})
    with pytest.raises(ConfigError, match="STEPLINE_STREAM_PREFIX"):
        NatsSettings.from_env(env)


def test_required_variables_say_so() -> None:
    with pytest.raises(ConfigError, match="STEPLINE_DATABASE_URL is required"):
        Env({}).text("DATABASE_URL")


def test_service_token_is_read_from_its_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    settings = ClientSettings.from_env(Env({"STEPLINE_SERVICE_TOKEN_FILE": str(token_file)}))
    assert settings.service_token == "s3cret"
    with pytest.raises(ConfigError, match="unreadable"):
        ClientSettings.from_env(Env({"STEPLINE_SERVICE_TOKEN_FILE": str(tmp_path / "none")}))


def test_auth_file_round_trip_holds_only_digests(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    Authenticator.write_file(path, [("tok-1", Principal("ops", frozenset({"admin"})))])
    assert "tok-1" not in path.read_text()
    authenticator = Authenticator.from_file(path)
    principal = authenticator.authenticate([("authorization", "Bearer tok-1")])
    assert principal == Principal("ops", frozenset({"admin"}))
    with pytest.raises(Unauthenticated):
        authenticator.authenticate([("authorization", "Bearer tok-2")])


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "needs a 'principals' list"),
        ({"principals": [{"id": "", "token_sha256": "0" * 64}]}, r"principals\[0\]\.id"),
        ({"principals": [{"id": "a", "token_sha256": "short"}]}, "token_sha256"),
        ({"principals": [{"id": "a", "token_sha256": "0" * 64, "roles": "admin"}]}, "roles"),
    ],
)
def test_malformed_auth_files_are_refused(tmp_path: Path, document: object, message: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=message):
        Authenticator.from_file(path)
