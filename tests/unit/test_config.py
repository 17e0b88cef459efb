"""Tenant configuration: secrets, allow-lists, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import ConfigError, hash_secret, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingest.toml"
    path.write_text(text)
    return path


def test_tenants_secrets_and_allow_lists(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[kafka]
bootstrap_servers = "k1:9092"
[ingest]
produce_budget_seconds = 1.5
spool_dir = "spool"
[tenants.acme]
token_sha256 = "{hash_secret('s3cret')}"
allow_from = ["62.39.136.157/32", "10.0.0.0/8"]
[tenants.globex]
token_sha256 = "{hash_secret('other')}"
""")
    settings = load_settings(path, env={})
    acme = settings.tenants["acme"]
    assert acme.key_matches("s3cret") and not acme.key_matches("s3cret ")
    assert acme.source_allowed("62.39.136.157") and acme.source_allowed("10.1.2.3")
    assert acme.source_allowed("::ffff:62.39.136.157")
    assert not acme.source_allowed("62.39.136.158") and not acme.source_allowed("junk")
    assert settings.tenants["globex"].source_allowed("203.0.113.9")
    assert settings.bootstrap_servers == "k1:9092"
    assert settings.produce_budget_seconds == 1.5
    assert settings.spool_dir == tmp_path / "spool"
    env = load_settings(path, env={"KAFKA_BOOTSTRAP_SERVERS": "k2:9092", "KEYYO_TOPIC_PREFIX": "p."})
    assert (env.bootstrap_servers, env.topic_prefix) == ("k2:9092", "p.")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[tenants.acme]\ntoken_sha256 = "abc"\n', "tenants.acme]: token_sha256"),
        (f'[tenants."a b"]\ntoken_sha256 = "{"0" * 64}"\n', "tenant id"),
        (f'[tenants.acme]\ntoken_sha256 = "{"0" * 64}"\nallow_from = ["300.1.1.1/8"]\n', "allow_from"),
        ("[tenants\n", "ingest.toml"),
        ('[ingest]\nproduce_budget_seconds = "soon"\n', "[ingest]"),
    ],
)
def test_errors_say_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write(tmp_path, text), env={})
