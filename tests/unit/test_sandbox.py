"""The Keyyo sandbox against keyyo.md §2, and the executor's view of Keyyo's answers (pure).

The sandbox runs on a real local port; requests go through aiohttp's own Digest client, as the
executor's do.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from devtools.sandbox import Faults, Sandbox, lines_from_config, running
from processors.keyyo_api import (
    ExecutorConfig,
    ExecutorConfigError,
    backoff_s,
    classify,
    load_executor_config,
    request_for,
)
from schemas.actions import Action

LINE, OTHER = "33123456789", "33987654321"


def digest(line: str = LINE, password: str = "s3cret") -> aiohttp.DigestAuthMiddleware:  # noqa: S107 - a test line
    return aiohttp.DigestAuthMiddleware(line, password)


async def get(url: str, params: dict[str, str], mw: aiohttp.DigestAuthMiddleware | None = None
              ) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(url, params=params, middlewares=(mw,) if mw else ()) as r:
        return r.status, await r.text(), dict(r.headers)


async def test_without_credentials_keyyo_answers_401_with_a_digest_challenge() -> None:
    async with running(Sandbox(passwords={LINE: "s3cret"})) as url:
        status, _, headers = await get(f"{url}/sendsms.html", {"ACCOUNT": LINE, "CALLEE": "33612345678",
                                                               "MSG": "x"})
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Digest ") and 'qop="auth"' in headers["WWW-Authenticate"]


async def test_the_three_endpoints_answer_ok_with_digest() -> None:
    sb = Sandbox(passwords={LINE: "s3cret"})
    mw = digest()
    async with running(sb) as url:
        answers = []
        for path, params in (
            ("sendsms.html", {"ACCOUNT": LINE, "CALLEE": "33612345678", "MSG": "Bonjour é&="}),
            ("makecall.html", {"ACCOUNT": LINE, "CALLEE": "33612345678", "CALLEE_NAME": "Client"}),
            ("makecall.html", {"ACCOUNT": LINE, "CALLEE": "33612345678", "CALLER": "33100000001"}),
            ("setprofil.html", {"ACCOUNT": LINE, "PROFIL": "Fermé"}),
        ):
            answers.append((await get(f"{url}/{path}", params, mw))[:2])
            sb.last_accepted.clear()  # not testing the rate limit here
    assert answers == [(200, "OK")] * 4
    executed = [r for r in sb.requests if r["executed"]]
    assert [r["kind"] for r in executed] == ["sms", "call", "connect", "profile"]
    assert executed[0]["params"]["MSG"] == "Bonjour é&="
    assert executed[3]["params"]["PROFIL"] == "Fermé"


async def test_a_wrong_password_or_another_lines_login_is_refused() -> None:
    sb = Sandbox(passwords={LINE: "s3cret", OTHER: "other"})
    async with running(sb) as url:
        wrong, _, _ = await get(f"{url}/setprofil.html", {"ACCOUNT": LINE, "PROFIL": "p"},
                                digest(password="nope"))
        borrowed, _, _ = await get(f"{url}/setprofil.html", {"ACCOUNT": LINE, "PROFIL": "p"},
                                   digest(OTHER, "other"))
    assert (wrong, borrowed) == (401, 401)
    assert not any(r["executed"] for r in sb.requests)


async def test_one_request_per_second_per_line_else_come_back_later_not_executed() -> None:
    sb = Sandbox(passwords={})  # IP-source lines
    async with running(sb) as url:
        first = await get(f"{url}/setprofil.html", {"ACCOUNT": LINE, "PROFIL": "a"})
        second = await get(f"{url}/setprofil.html", {"ACCOUNT": LINE, "PROFIL": "b"})
        other_line = await get(f"{url}/setprofil.html", {"ACCOUNT": OTHER, "PROFIL": "b"})
        sb.last_accepted[LINE] -= 1.0  # a second has passed for the line, without waiting for it
        third = await get(f"{url}/setprofil.html", {"ACCOUNT": LINE, "PROFIL": "c"})
    assert [a[:2] for a in (first, second, other_line, third)] == [
        (200, "OK"), (500, "Come Back Later"), (200, "OK"), (200, "OK")]
    assert [r["executed"] for r in sb.requests] == [True, False, True, True]


async def test_injected_failures_and_hangs() -> None:
    sb = Sandbox(faults=Faults(fail_rate=1.0))
    async with running(sb) as url:
        ko = await get(f"{url}/sendsms.html", {"ACCOUNT": LINE, "CALLEE": "33612345678", "MSG": "x"})
        sb.faults = Faults(hang_rate=1.0, hang_seconds=2.0)
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
            with pytest.raises(TimeoutError):
                await s.get(f"{url}/sendsms.html", params={"ACCOUNT": OTHER, "CALLEE": "33612345678",
                                                          "MSG": "x"})
        assert time.monotonic() - started < 1.5
        async with aiohttp.ClientSession() as s, \
                s.get(f"{url}/_sandbox/requests", params={"kind": "sms"}) as r:
            listed = await r.json()
    assert ko[:2] == (200, "KO")
    assert [(x["status"], x["executed"]) for x in listed] == [(200, False), (200, True)]


async def test_missing_parameters_are_refused() -> None:
    async with running(Sandbox()) as url:
        status, body, _ = await get(f"{url}/sendsms.html", {"ACCOUNT": LINE, "CALLEE": "33612345678"})
    assert (status, body) == (400, "KO missing MSG")


def action(kind: str, **kw: str | None) -> Action:
    fields: dict[str, str | None] = {"callee": "33612345678", "caller": None, "callee_name": None,
                                     "message": None, "profile": None, **kw}
    return Action(action_id="0" * 32, tenant="acme", kind=kind, account=LINE,
                  not_before="2026-01-01T00:00:00Z", expires_at="2026-01-01T01:00:00Z", origin={},
                  created_at="2026-01-01T00:00:00Z", **fields)  # type: ignore[arg-type]


def test_requests_follow_keyyos_parameters() -> None:
    assert request_for(action("sms", message="Bonjour")) == (
        "sendsms.html", {"ACCOUNT": LINE, "CALLEE": "33612345678", "MSG": "Bonjour"})
    assert request_for(action("call", callee_name="Client")) == (
        "makecall.html", {"ACCOUNT": LINE, "CALLEE": "33612345678", "CALLEE_NAME": "Client"})
    assert request_for(action("connect", caller="33100000001")) == (
        "makecall.html", {"ACCOUNT": LINE, "CALLEE": "33612345678", "CALLER": "33100000001"})
    assert request_for(action("profile", callee=None, profile="Fermé")) == (
        "setprofil.html", {"ACCOUNT": LINE, "PROFIL": "Fermé"})


@pytest.mark.parametrize(("kind", "status", "body", "error", "verdict"), [
    ("sms", 200, "OK\n", None, "sent"),
    ("sms", 500, "Come Back Later", None, "retry"),
    ("sms", None, None, "not_sent", "retry"),
    ("sms", None, None, "lost", "unknown"),
    ("call", 200, "KO", None, "unknown"),
    ("connect", 502, "Bad Gateway", None, "unknown"),
    ("sms", 401, "Unauthorized", None, "failed"),
    ("sms", 400, "KO", None, "failed"),
    ("profile", None, None, "lost", "retry"),
    ("profile", 200, "KO", None, "retry"),
    ("profile", 200, "OK", None, "sent"),
])
def test_what_an_answer_means(kind: str, status: int | None, body: str | None, error: str | None,
                              verdict: str) -> None:
    assert classify(kind, status, body, error)[0] == verdict


def test_backoff_doubles_up_to_its_ceiling() -> None:
    c = ExecutorConfig(min_interval_s=1.1, max_backoff_s=5.0)
    assert [backoff_s(c, n) for n in (1, 2, 3, 4)] == [1.1, 2.2, 4.4, 5.0]


def test_executor_config_with_a_secrets_file(tmp_path: Path) -> None:
    (tmp_path / "secrets.toml").write_text(f'[lines."{OTHER}"]\npassword = "from-secrets"\n')
    (tmp_path / "executor.toml").write_text(
        '[keyyo]\nbase_url = "http://127.0.0.1:8090/"\nsecrets_file = "secrets.toml"\n'
        f'[lines."{LINE}"]\npassword = "s3cret"\n')
    config = load_executor_config(tmp_path / "executor.toml")
    assert config.base_url == "http://127.0.0.1:8090"
    assert config.passwords == {LINE: "s3cret", OTHER: "from-secrets"}
    assert "s3cret" not in repr(config) and "from-secrets" not in repr(config)
    assert lines_from_config(tmp_path / "executor.toml") == config.passwords
    assert config.can_send(LINE) and not config.can_send("33100000009")


@pytest.mark.parametrize(("text", "message"), [
    ('[keyyo]\nmin_interval_seconds = 0.5', "below Keyyo's 1 s"),
    ('[keyyo]\nauth = "basic"', "digest or ip"),
    ('[keyyo]\nbase_url = "ftp://x"', "http"),
    ('[lines."33123456789"]\nuser = "x"', "needs password"),
    ('[lines."+33123456789"]\npassword = "x"', "international digits"),
    ('[keyyo]\npassword = "x"', "unknown key"),
])
def test_executor_config_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "executor.toml").write_text(text)
    with pytest.raises(ExecutorConfigError, match=message):
        load_executor_config(tmp_path / "executor.toml")
