"""Keyyo's server API as the executor uses it: settings, requests, and what an answer means.

Pure (no I/O): the executor (:mod:`processors.executor`) sends what :func:`request_for` builds and
acts on what :func:`classify` says. Facts from keyyo.md §2: GET requests answered ``OK`` (plain
text) on success, HTTP Digest per line or IP source, one request per second per line, ``500 Come
Back Later`` for excess (not executed, retryable); other failure bodies are undocumented.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from schemas.actions import ACCOUNT, NOT_REPEATABLE, Action

ENDPOINTS = {"sms": "sendsms.html", "call": "makecall.html", "connect": "makecall.html",
             "profile": "setprofil.html"}
DEFAULT_BASE_URL = "https://ssl.keyyo.com"


class ExecutorConfigError(ValueError):
    """The executor's config file is invalid; the message says where."""


@dataclass(frozen=True)
class ExecutorConfig:
    """What ``--config`` holds (README, *Outbound actions*)."""

    base_url: str = DEFAULT_BASE_URL
    auth: Literal["digest", "ip"] = "digest"
    """``digest``: each line's SIP login (its number) and password; ``ip``: Keyyo trusts our source
    address (the line's "IP source" setting), no credentials."""
    passwords: dict[str, str] = field(default_factory=dict, repr=False)
    """SIP password per line (never logged, never written)."""
    timeout_s: float = 10.0
    """A request not answered within this is ``unknown`` (it may have been executed)."""
    connect_timeout_s: float = 5.0
    """A connection not made within this: nothing was sent, so it is retried."""
    min_interval_s: float = 1.1
    """Between two requests of a line (Keyyo allows one per second; the margin absorbs jitter)."""
    max_backoff_s: float = 30.0
    """Longest wait between retries of ``500 Come Back Later`` (doubling from ``min_interval_s``)."""
    max_attempts: int = 20
    """Requests per action at most (retries of not-executed answers included)."""

    def credentials(self, line: str) -> str | None:
        """The line's SIP password; None when the line has none (or in IP mode)."""
        return None if self.auth == "ip" else self.passwords.get(line)

    def can_send(self, line: str) -> bool:
        """Whether requests for ``line`` can be authorised at all."""
        return self.auth == "ip" or line in self.passwords


def _lines(where: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ExecutorConfigError(f'{where}: [lines."<number>"] tables expected')
    out = {}
    for line, entry in raw.items():
        if not ACCOUNT.fullmatch(line):
            raise ExecutorConfigError(f"{where}: line {line!r} must be international digits without +")
        if not isinstance(entry, dict) or not isinstance(entry.get("password"), str) or not entry["password"]:
            raise ExecutorConfigError(f'{where}: [lines."{line}"] needs password = "<SIP password>"')
        out[line] = entry["password"]
    return out


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ExecutorConfigError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ExecutorConfigError(f"{path}: {exc}") from None


def load_executor_config(path: str | Path | None) -> ExecutorConfig:
    """The executor's config file: ``[keyyo]`` settings and ``[lines."<number>"] password``, the
    passwords possibly in a separate ``secrets_file`` (same ``[lines]`` form)."""
    if path is None:
        return ExecutorConfig()
    path = Path(path)
    data = _load_toml(path)
    if unknown := set(data) - {"keyyo", "lines"}:
        raise ExecutorConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    keyyo = data.get("keyyo", {})
    known = {"base_url", "auth", "timeout_seconds", "connect_timeout_seconds", "min_interval_seconds",
             "max_backoff_seconds", "max_attempts", "secrets_file"}
    if unknown := set(keyyo) - known:
        raise ExecutorConfigError(f"{path}: [keyyo]: unknown key(s) {', '.join(sorted(unknown))}")
    passwords = _lines(str(path), data.get("lines", {}))
    if secrets_file := keyyo.get("secrets_file"):
        secret_path = path.parent / str(secrets_file)
        passwords.update(_lines(str(secret_path), _load_toml(secret_path).get("lines", {})))
    base_url = str(keyyo.get("base_url", DEFAULT_BASE_URL)).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ExecutorConfigError(f"{path}: [keyyo] base_url must start with http:// or https://")
    auth = keyyo.get("auth", "digest")
    if auth not in ("digest", "ip"):
        raise ExecutorConfigError(f"{path}: [keyyo] auth must be digest or ip")
    try:
        config = ExecutorConfig(
            base_url=base_url, auth=auth, passwords=passwords,
            timeout_s=float(keyyo.get("timeout_seconds", 10.0)),
            connect_timeout_s=float(keyyo.get("connect_timeout_seconds", 5.0)),
            min_interval_s=float(keyyo.get("min_interval_seconds", 1.1)),
            max_backoff_s=float(keyyo.get("max_backoff_seconds", 30.0)),
            max_attempts=int(keyyo.get("max_attempts", 20)))
    except (TypeError, ValueError) as exc:
        raise ExecutorConfigError(f"{path}: [keyyo]: {exc}") from None
    if config.min_interval_s < 1.0:
        raise ExecutorConfigError(f"{path}: [keyyo] min_interval_seconds below Keyyo's 1 s per line")
    if config.timeout_s <= 0 or config.connect_timeout_s <= 0 or config.max_attempts < 1:
        raise ExecutorConfigError(f"{path}: [keyyo] timeouts must be positive and max_attempts >= 1")
    return config


def request_for(action: Action) -> tuple[str, dict[str, str]]:
    """The endpoint and query parameters of an action (keyyo.md §2)."""
    params = {"ACCOUNT": action.account}
    if action.kind == "profile":
        params["PROFIL"] = action.profile or ""
    else:
        params["CALLEE"] = action.callee or ""
    if action.kind == "sms":
        params["MSG"] = action.message or ""
    if action.kind == "connect":
        params["CALLER"] = action.caller or ""
    if action.kind in ("call", "connect") and action.callee_name:
        params["CALLEE_NAME"] = action.callee_name
    return ENDPOINTS[action.kind], params


Verdict = Literal["sent", "failed", "unknown", "retry"]


def classify(kind: str, status: int | None, body: str | None, error: str | None) -> tuple[Verdict, str]:
    """What an attempt's answer means, and why.

    ``error``: ``not_sent`` (no connection: the request never left), ``lost`` (timeout or
    connection lost after it left), else None. ``retry`` only when the request was certainly not
    executed, or the action is idempotent (a profile switch).
    """
    repeatable = kind not in NOT_REPEATABLE
    if error == "not_sent":
        return "retry", "Keyyo could not be reached (nothing was sent)"
    if error is not None or status is None:
        why = "no answer from Keyyo in time, or the connection was lost after the request left"
        return ("retry", why) if repeatable else ("unknown", why + ": it may have been executed")
    text = (body or "").strip()
    if status == 200 and text == "OK":
        return "sent", "Keyyo answered OK" + (" (accepted; no delivery receipt)" if kind == "sms" else "")
    if status == 500 and "come back later" in text.lower():
        return "retry", "500 Come Back Later: Keyyo's one request per second per line (not executed)"
    if status in (401, 403):
        return "failed", f"Keyyo refused the line's credentials ({status})"
    if 400 <= status < 500:
        return "failed", f"Keyyo refused the request ({status})"
    why = f"Keyyo answered {status} {text[:80]!r}, not OK"
    return ("retry", why) if repeatable else ("unknown", why + ": it may have been executed")


def backoff_s(config: ExecutorConfig, retries: int) -> float:
    """Wait before the next try of an action refused as not executed, after ``retries`` of them."""
    return float(min(config.max_backoff_s, config.min_interval_s * 2 ** max(0, retries - 1)))
