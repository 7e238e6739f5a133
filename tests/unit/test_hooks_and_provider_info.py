"""The connection types in the provider info match the hooks; ``test_connection`` never raises."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from airflow_embedding_provider.get_provider_info import get_provider_info
from airflow_embedding_provider.hooks.grpc_cache import GrpcCacheHook
from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook


def test_provider_info_validates_against_airflows_schema() -> None:
    schema = json.loads(resources.files("airflow").joinpath("provider_info.schema.json").read_text())
    assert list(jsonschema.Draft7Validator(schema).iter_errors(get_provider_info())) == []


@pytest.mark.parametrize("hook", [GrpcEmbeddingHook, GrpcCacheHook])
def test_each_hook_has_its_connection_type_with_its_port(hook: type[GrpcEmbeddingHook | GrpcCacheHook]) -> None:
    types = {c["connection-type"]: c for c in get_provider_info()["connection-types"]}
    entry = types[hook.conn_type]
    assert entry["hook-class-name"] == f"{hook.__module__}.{hook.__qualname__}"
    assert entry["hook-name"] == hook.hook_name
    assert entry["ui-field-behaviour"]["placeholders"]["port"] == str(hook.default_port)
    assert entry["conn-fields"]["token"]["schema"]["format"] == "password"


def test_the_two_servers_have_two_types() -> None:
    assert GrpcEmbeddingHook.conn_type != GrpcCacheHook.conn_type
    assert GrpcEmbeddingHook.default_port != GrpcCacheHook.default_port


@pytest.mark.parametrize("hook", [GrpcEmbeddingHook, GrpcCacheHook])
def test_test_connection_on_a_missing_connection_returns_false(hook: type[GrpcEmbeddingHook | GrpcCacheHook]) -> None:
    ok, message = hook("no_such_connection_anywhere").test_connection()
    assert ok is False
    assert "no_such_connection_anywhere" in message and "isn't defined" in message
