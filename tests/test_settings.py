"""Settings are read once, validated, and never show a key."""
from __future__ import annotations

import pytest

from embedding_server.operations.settings import (
    DEFAULT_EMBEDDING_CACHE_MB,
    DEFAULT_MODEL_NAME,
    Settings,
    SettingsError,
    Streams,
    read_api_keys,
)


def test_defaults_generate_a_strong_key():
    settings = Settings.from_env({})
    assert settings.api_key_generated and len(settings.api_keys) == 1 and len(settings.api_keys[0]) >= 32
    assert Settings.from_env({}).api_keys != settings.api_keys
    assert (settings.http_port, settings.grpc_port, settings.model_name) == (8080, 8081, DEFAULT_MODEL_NAME)
    assert settings.show_api_key_info is False
    assert settings.model_path.endswith("model")


def test_port_and_names_from_the_environment():
    settings = Settings.from_env({"PORT": "10000", "MODEL_NAME": "minilm", "SHOW_API_KEY_INFO": "true", "API_KEY": "k"})
    assert (settings.http_port, settings.model_name, settings.show_api_key_info) == (10000, "minilm", True)
    assert settings.api_keys == ("k",) and not settings.api_key_generated


def test_the_embedding_cache_is_on_by_default_and_0_turns_it_off():
    assert Settings.from_env({"API_KEY": "k"}).embedding_cache_mb == DEFAULT_EMBEDDING_CACHE_MB > 0
    assert Settings.from_env({"API_KEY": "k", "EMBEDDING_CACHE_MB": "0"}).embedding_cache_mb == 0
    assert Settings.from_env({"API_KEY": "k", "EMBEDDING_CACHE_MB": "256"}).embedding_cache_mb == 256


def test_keys_from_every_source_without_duplicates(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("file-key\n\n  b \n")
    keys = read_api_keys({"API_KEY": " a ", "API_KEYS": "b,c,,a", "API_KEY_FILE": str(key_file)})
    assert keys == ("a", "b", "c", "file-key")


@pytest.mark.parametrize("env,name", [
    ({"PORT": "eighty"}, "PORT"),
    ({"PORT": "0"}, "PORT"),
    ({"SHOW_API_KEY_INFO": "maybe"}, "SHOW_API_KEY_INFO"),
    ({"BACKEND": "gpu"}, "BACKEND"),
    ({"PRECISION": "int8"}, "PRECISION"),
    ({"STREAMS": "-1"}, "STREAMS"),
    ({"STREAMS_QUEUE_TOKENS": "-5"}, "STREAMS_QUEUE_TOKENS"),
    ({"API_KEY_FILE": "/no/such/file"}, "API_KEY_FILE"),
    ({"EMBEDDING_CACHE_MB": "-1"}, "EMBEDDING_CACHE_MB"),
    ({"EMBEDDING_CACHE_MB": "lots"}, "EMBEDDING_CACHE_MB"),
])
def test_bad_values_name_the_setting(env, name):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({"API_KEY": "k", **env})


def test_streams_default_to_the_runtimes_choice_under_a_deep_queue():
    assert Settings.from_env({"API_KEY": "k"}).streams == Streams(streams=0, queue_tokens=0)
    settings = Settings.from_env({"API_KEY": "k", "STREAMS": "1", "STREAMS_QUEUE_TOKENS": "8192"})
    assert settings.streams == Streams(streams=1, queue_tokens=8192)


def test_repr_hides_keys():
    assert "secret-value" not in repr(Settings.from_env({"API_KEY": "secret-value"}))
