"""Tenant configuration: secrets, allow-lists, and errors that say where."""

from __future__ import annotations

import logging
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
        (f'[tenants.acme]\ntoken_sha256 = "{"0" * 64}"\nmax_per_second = -1\n',
         "tenants.acme]: max_per_second"),
        (f'[tenants.acme]\ntoken_sha256 = "{"0" * 64}"\nmax_per_second = "fast"\n', "max_per_second"),
        ("[ingest]\ntenant_max_per_second = true\n", "[ingest]: tenant_max_per_second"),
        (f'[tenants.acme]\ntoken_sha256 = ["{"0" * 64}", "{"0" * 64}"]\n', "lists the same secret twice"),
        (f'[tenants.acme]\ntoken_sha256 = [{", ".join(repr(str(i) * 64) for i in range(5))}]\n',
         "a list of 1 to 4"),
        ("[tenants.acme]\ntoken_sha256 = []\n", "a list of 1 to 4"),
        (f'[tenants.acme]\ntoken_sha256 = "{"0" * 64}"\napi_token_sha256 = ["{"1" * 64}", "{"0" * 64}"]\n',
         "api_token_sha256 must differ"),
        (f'[tenants.acme]\ntoken_sha256 = ["{"0" * 64}", "xyz"]\n', "tenants.acme]: token_sha256"),
        (f'[tenants.acme]\ntoken_sha256 = ["{"0" * 64}", "{"1" * 64}"]\napi_token_sha256 = "{"1" * 64}"\n',
         "api_token_sha256 must differ"),
    ],
)
def test_errors_say_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write(tmp_path, text), env={})


def test_request_budgets_per_tenant(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[ingest]
tenant_max_per_second = 200
[tenants.acme]
token_sha256 = "{hash_secret('s3cret')}"
max_per_second = 50
[tenants.globex]
token_sha256 = "{hash_secret('other')}"
[tenants.initech]
token_sha256 = "{hash_secret('third')}"
max_per_second = 0
""")
    settings = load_settings(path, env={})
    assert settings.tenant_max_per_second == 200
    assert [settings.tenants[t].max_per_second for t in ("acme", "globex", "initech")] == [50, None, 0]
    assert load_settings(write(tmp_path, ""), env={}).tenant_max_per_second == 0  # no limit by default


def test_a_budget_lets_a_burst_through_then_refills_at_its_rate() -> None:
    from ingest.budget import Budgets

    now = [100.0]
    budgets = Budgets({"acme": 5.0, "globex": 0.0}, clock=lambda: now[0])
    assert [budgets.take("acme") for _ in range(10)] == [None] * 10  # two seconds' worth at once
    wait = budgets.take("acme")
    assert wait == pytest.approx(0.2)  # one request's worth at 5/s
    assert all(budgets.take("globex") is None for _ in range(1000))  # 0: no limit
    assert budgets.take("unknown") is None
    now[0] += 0.2
    assert budgets.take("acme") is None and budgets.take("acme") is not None
    now[0] += 60
    assert [budgets.take("acme") for _ in range(11)].count(None) == 10  # refilled to the burst, no more


def test_a_key_rotation_accepts_every_listed_key_and_says_which(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[tenants.acme]
token_sha256 = ["{hash_secret('new-secret')}", "{hash_secret('old-secret')}"]
[tenants.globex]
token_sha256 = "{hash_secret('other')}"
""")
    tenants = load_settings(path, env={}).tenants
    acme = tenants["acme"]
    assert [acme.key_index(k) for k in ("new-secret", "old-secret", "other", "")] == [0, 1, None, None]
    assert acme.key_matches("old-secret") and not tenants["globex"].key_matches("old-secret")
    assert tenants["globex"].key_index("other") == 0
    assert tenants["globex"].api_token_index("") is None  # no actions API: nothing matches


def test_an_api_token_rotation_works_the_same_way(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[tenants.acme]
token_sha256 = "{hash_secret('key')}"
api_token_sha256 = ["{hash_secret('api-new')}", "{hash_secret('api-old')}"]
""")
    acme = load_settings(path, env={}).tenants["acme"]
    assert [acme.api_token_index(t) for t in ("api-new", "api-old", "key", "")] == [0, 1, None, None]


async def test_a_reload_applies_the_tenants_and_keeps_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ingest.app import TENANTS, build_app, reload_tenants

    caplog.set_level(logging.INFO, logger="keyyo.ingest")
    first = f"""
[ingest]
produce_budget_seconds = 2.0
[tenants.acme]
token_sha256 = "{hash_secret('s3cret')}"
max_per_second = 5
"""
    path = write(tmp_path, first)
    app = build_app(load_settings(path, env={}))
    table = app[TENANTS]
    assert list(table.by_id) == ["acme"] and table.budgets.take("acme") is None

    path.write_text(f"""
[ingest]
produce_budget_seconds = 9.0
[tenants.acme]
token_sha256 = ["{hash_secret('rotated')}", "{hash_secret('s3cret')}"]
[tenants.globex]
token_sha256 = "{hash_secret('other')}"
""")
    assert await reload_tenants(app, lambda: load_settings(path, env={}))
    assert app[TENANTS] is table and sorted(table.by_id) == ["acme", "globex"]
    assert table.by_id["acme"].key_index("s3cret") == 1
    assert all(table.budgets.take("acme") is None for _ in range(100))  # its budget went with the file
    assert "configuration reloaded except settings that need a restart: produce_budget_seconds" in caplog.text
    reloaded = next(r for r in caplog.records if r.getMessage() == "configuration reloaded")
    assert (reloaded.added, reloaded.removed, reloaded.changed) == (["globex"], [], ["acme"])  # type: ignore[attr-defined]

    path.write_text("[tenants.acme]\ntoken_sha256 = 'oops'\n")
    caplog.clear()
    assert not await reload_tenants(app, lambda: load_settings(path, env={}))
    assert sorted(table.by_id) == ["acme", "globex"]  # a mistake changes nothing
    assert "configuration not reloaded, the running one is kept: " in caplog.text
    assert "token_sha256 must be 64 hex digits" in caplog.text
