"""The API key: where the server reads it, and the two header forms a call may present it in."""

from __future__ import annotations

import pytest

from router_service.auth import API_KEY_ENV, is_authorized, load_api_key, presented_keys


def test_the_key_comes_from_the_file_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert load_api_key(None) is None  # no key: every call is served
    monkeypatch.setenv(API_KEY_ENV, "from-env\n")  # as a Secret's value may end
    assert load_api_key(None) == "from-env"
    (tmp_path / "key").write_text("  from-file\n")
    assert load_api_key(str(tmp_path / "key")) == "from-file"  # the file wins, trimmed
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="api_key_file: .*empty is empty"):
        load_api_key(str(tmp_path / "empty"))


@pytest.mark.parametrize("value", ["", " \n"])
def test_a_key_variable_set_empty_is_an_error_not_no_key(monkeypatch, value):
    """A Secret made from an empty value must not leave the server open to every caller."""
    monkeypatch.setenv(API_KEY_ENV, value)
    with pytest.raises(ValueError, match=f"^{API_KEY_ENV} is set but empty"):
        load_api_key(None)


@pytest.mark.parametrize("key", ["clé", "tab\tin-it"])
def test_a_key_no_client_could_send_is_an_error(tmp_path, monkeypatch, key):
    """gRPC metadata and HTTP headers carry printable ASCII alone: a key of other characters would refuse every
    call, so the server refuses to start with it, naming where it came from."""
    monkeypatch.setenv(API_KEY_ENV, key)
    with pytest.raises(ValueError, match=f"^{API_KEY_ENV}: the key holds characters other than printable ASCII"):
        load_api_key(None)
    (tmp_path / "key").write_text(key)
    with pytest.raises(ValueError, match="^api_key_file: .*key: the key holds characters other than printable"):
        load_api_key(str(tmp_path / "key"))


@pytest.mark.parametrize("metadata, keys", [
    ([("authorization", "Bearer s3cret")], ["s3cret"]),
    ([("Authorization", "Bearer s3cret")], ["s3cret"]),  # HTTP header names are case-insensitive
    ([("x-api-key", "s3cret")], ["s3cret"]),
    ([("user-agent", "curl"), ("X-API-Key", " s3cret ")], ["s3cret"]),  # gRPC metadata is not trimmed for us
    ([("authorization", "bearer s3cret")], ["s3cret"]),  # nor is the scheme's
    ([("authorization", "Bearer  s3cret ")], ["s3cret"]),  # spaces around the token, as some clients send them
    ([("authorization", "Basic czNjcmV0")], []),  # not a bearer token
    ([("grpc-trace-bin", b"\x00\x01"), ("authorization", "Bearer s3cret")], ["s3cret"]),  # binary metadata passed over
    ([("authorization", "Bearer gateway"), ("x-api-key", "s3cret")], ["gateway", "s3cret"]),  # another layer's too
    ([], []),
])
def test_presented_keys(metadata, keys):
    assert presented_keys(metadata) == keys


def test_any_key_presented_may_be_the_right_one():
    """Fails if only the first key presented counts (a gateway's bearer token beside the caller's x-api-key)."""
    assert is_authorized([("authorization", "Bearer gateway"), ("x-api-key", "s3cret")], "s3cret")
    assert is_authorized([("x-api-key", "s3cret"), ("authorization", "Bearer gateway")], "s3cret")
    assert not is_authorized([("authorization", "Bearer gateway"), ("x-api-key", "other")], "s3cret")
    assert not is_authorized([], "s3cret")
