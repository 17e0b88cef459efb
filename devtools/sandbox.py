"""``keyyo-stream sandbox``: a local emulation of Keyyo's action endpoints (keyyo.md §2).

Keyyo's servers cannot be reached from here; this stands in for them, written from the operator's
documentation alone (it shares no code with the executor it checks):

- ``GET /makecall.html`` (ACCOUNT, CALLEE, CALLEE_NAME, optional CALLER, RECORD),
  ``/sendsms.html`` (ACCOUNT, CALLEE, MSG), ``/setprofil.html`` (ACCOUNT, PROFIL), answered ``OK``;
- HTTP Digest (MD5, qop=auth) with the line number as user and its SIP password; no credentials
  gets ``401`` with a challenge; lines without a password are accepted by "IP source";
- one request per second per line: a faster one gets ``500 Come Back Later`` (not executed);
- injected faults: latency, failures (``KO``, not executed), hangs (executed, answer never sent);
- every request recorded: ``GET /_sandbox/requests`` (``?kind=sms``), ``DELETE`` to clear,
  ``POST /_sandbox/faults`` to change the faults;
- ``makecall`` can play the call's notifications (SETUP, CONNECT, RELEASE on ACCOUNT's line) into
  an ingest URL, so a click-to-call closes the loop into a call record.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import signal
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("keyyo.sandbox")

REALM = "keyyo"
ENDPOINTS = {"/makecall.html": "call", "/sendsms.html": "sms", "/setprofil.html": "profile"}
REQUIRED = {"call": ("ACCOUNT", "CALLEE"), "sms": ("ACCOUNT", "CALLEE", "MSG"),
            "profile": ("ACCOUNT", "PROFIL")}


@dataclass
class Faults:
    """What the sandbox does wrong, on purpose."""

    latency_ms: int = 0
    """Added before every answer."""
    slow_accounts: dict[str, float] = field(default_factory=dict)
    """Seconds added before answering these lines' requests (a slow line)."""
    fail_rate: float = 0.0
    """Share of authorised, in-rate requests answered ``KO`` (not executed)."""
    hang_rate: float = 0.0
    """Share executed but answered only after ``hang_seconds`` (a client times out: unknown)."""
    hang_seconds: float = 30.0
    rate_limit_s: float = 1.0
    """Minimum time between two requests of a line (Keyyo: one per second)."""


@dataclass
class Sandbox:
    """The emulated servers' state."""

    passwords: dict[str, str] = field(default_factory=dict)
    """Lines with Digest credentials; other lines are accepted by IP source."""
    open_lines: bool = True
    """Accept lines not listed (as IP-source lines); False: only listed lines."""
    faults: Faults = field(default_factory=Faults)
    notify_url: str | None = None
    """Ingest notification URL (with its key) that makecall plays the call's notifications into."""
    talk_seconds: float = 3.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    last_accepted: dict[str, float] = field(default_factory=dict)
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    opaque: str = field(default_factory=lambda: secrets.token_hex(8))
    rng: random.Random = field(default_factory=random.Random)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


SANDBOX = web.AppKey("sandbox", Sandbox)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def _parse_digest(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    if scheme.lower() != "digest":
        return {}
    out: dict[str, str] = {}
    for part in _split_commas(rest):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name.strip().lower()] = value.strip().strip('"')
    return out


def _split_commas(text: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _authorised(sb: Sandbox, request: web.Request, account: str) -> bool:
    password = sb.passwords.get(account)
    if password is None:
        return sb.open_lines  # an IP-source line
    d = _parse_digest(request.headers.get("Authorization", ""))
    if not d or d.get("username") != account or d.get("nonce") != sb.nonce or d.get("realm") != REALM:
        return False
    if d.get("uri") != request.raw_path:
        return False
    ha1 = _md5(f"{account}:{REALM}:{password}")
    ha2 = _md5(f"{request.method}:{d['uri']}")
    if d.get("qop") == "auth":
        expected = _md5(f"{ha1}:{sb.nonce}:{d.get('nc', '')}:{d.get('cnonce', '')}:auth:{ha2}")
    else:
        expected = _md5(f"{ha1}:{sb.nonce}:{ha2}")
    return secrets.compare_digest(expected, d.get("response", ""))


async def handle_action(request: web.Request) -> web.Response:
    """One of the three endpoints."""
    sb = request.app[SANDBOX]
    kind = ENDPOINTS[request.path]
    params = {k: v for k, v in request.query.items()}
    if kind == "call" and params.get("CALLER"):
        kind = "connect"
    account = params.get("ACCOUNT", "")
    entry: dict[str, Any] = {"n": len(sb.requests) + 1, "at": time.time(), "kind": kind,
                             "path": request.path, "account": account, "params": params,
                             "executed": False}
    sb.requests.append(entry)
    if sb.faults.latency_ms:
        await asyncio.sleep(sb.faults.latency_ms / 1000)
    if account in sb.faults.slow_accounts:
        await asyncio.sleep(sb.faults.slow_accounts[account])
    if not _authorised(sb, request, account):
        entry.update(status=401, body="Unauthorized", authorised=False)
        challenge = (f'Digest realm="{REALM}", nonce="{sb.nonce}", qop="auth", algorithm=MD5, '
                     f'opaque="{sb.opaque}"')
        return web.Response(status=401, text="Unauthorized", headers={"WWW-Authenticate": challenge})
    entry["authorised"] = True
    missing = [p for p in REQUIRED["call" if kind == "connect" else kind] if not params.get(p)]
    if missing:
        entry.update(status=400, body=f"KO missing {missing[0]}")
        return web.Response(status=400, text=entry["body"])
    now = time.monotonic()
    last = sb.last_accepted.get(account)
    if last is not None and now - last < sb.faults.rate_limit_s:
        entry.update(status=500, body="Come Back Later")
        return web.Response(status=500, text="Come Back Later")
    sb.last_accepted[account] = now
    roll = sb.rng.random()
    if roll < sb.faults.fail_rate:
        entry.update(status=200, body="KO")
        return web.Response(text="KO")
    entry["executed"] = True
    if kind in ("call", "connect") and sb.notify_url and params.get("RECORD") != "1":
        task = asyncio.create_task(_play_call(request.app, account, params.get("CALLEE", "")))
        sb.tasks.add(task)
        task.add_done_callback(sb.tasks.discard)
    if roll < sb.faults.fail_rate + sb.faults.hang_rate:
        entry.update(status=200, body="OK (late)")
        await asyncio.sleep(sb.faults.hang_seconds)
        return web.Response(text="OK")
    entry.update(status=200, body="OK")
    return web.Response(text="OK")


async def _play_call(app: web.Application, account: str, callee: str) -> None:
    """The notifications of the call makecall placed: ACCOUNT rings, calls CALLEE, who answers."""
    sb = app[SANDBOX]
    assert sb.notify_url is not None
    dref = secrets.token_hex(16)
    callref = str(random.randint(10**11, 10**12 - 1))
    base = {"account": account, "caller": account, "callee": callee, "callref": callref, "dref": dref,
            "version": "1"}
    for kind, wait in (("SETUP", 0.0), ("CONNECT", 1.0), ("RELEASE", sb.talk_seconds)):
        await asyncio.sleep(wait)
        params = {**base, "type": kind, "tsms": str(time.time_ns() // 1_000_000)}
        try:
            async with app[SESSION].get(sb.notify_url, params=params) as resp:
                await resp.read()
                if resp.status != 200:
                    log.warning("ingest refused a sandbox notification", extra={"status": resp.status})
        except aiohttp.ClientError as exc:
            log.warning("could not notify ingest", extra={"error": repr(exc)})


async def handle_requests(request: web.Request) -> web.Response:
    """Every request received (``?kind=`` filters), oldest first."""
    sb = request.app[SANDBOX]
    kind = request.query.get("kind")
    return web.json_response([r for r in sb.requests if kind is None or r["kind"] == kind])


async def handle_clear(request: web.Request) -> web.Response:
    """Forget the recorded requests (and the rate limit's memory)."""
    sb = request.app[SANDBOX]
    sb.requests.clear()
    sb.last_accepted.clear()
    return web.json_response({"cleared": True})


async def handle_faults(request: web.Request) -> web.Response:
    """Change the injected faults: a JSON object of :class:`Faults` fields."""
    sb = request.app[SANDBOX]
    try:
        changes = await request.json()
        for name, value in changes.items():
            if name not in Faults.__dataclass_fields__:
                raise ValueError(f"unknown fault {name!r}")
            setattr(sb.faults, name, type(getattr(sb.faults, name))(value))
    except (ValueError, TypeError, AttributeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(sb.faults.__dict__)


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    yield
    for task in list(app[SANDBOX].tasks):
        task.cancel()
    await app[SESSION].close()


def build_app(sandbox: Sandbox) -> web.Application:
    """The sandbox's aiohttp application."""
    app = web.Application()
    app[SANDBOX] = sandbox
    app.cleanup_ctx.append(_session_ctx)
    for path in ENDPOINTS:
        app.router.add_get(path, handle_action)
    app.router.add_get("/_sandbox/requests", handle_requests)
    app.router.add_delete("/_sandbox/requests", handle_clear)
    app.router.add_post("/_sandbox/faults", handle_faults)
    return app


def lines_from_config(path: Path) -> dict[str, str]:
    """Lines and SIP passwords of an executor config file (and the secrets file it names)."""
    data = tomllib.loads(path.read_text())
    lines = dict(data.get("lines", {}))
    secrets_file = data.get("keyyo", {}).get("secrets_file")
    if secrets_file:
        for line, entry in tomllib.loads((path.parent / secrets_file).read_text()).get("lines", {}).items():
            lines.setdefault(line, {}).update(entry)
    return {line: str(entry["password"]) for line, entry in lines.items() if "password" in entry}


@contextlib.asynccontextmanager
async def running(sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the sandbox; yield its base URL."""
    runner = web.AppRunner(build_app(sandbox), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server: Any = site._server  # private: the only way to learn the port bound for port 0
    bound = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``keyyo-stream sandbox`` options."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--config", help="executor config file: its [lines.\"N\"] passwords are the lines' "
                   "Digest credentials (lines without one are accepted by IP source)")
    p.add_argument("--closed", action="store_true", help="refuse lines the config does not list")
    p.add_argument("--notify", metavar="URL", help="ingest notification URL with its key "
                   "(http://127.0.0.1:8080/v1/keyyo/TENANT/notifications?key=...): makecall plays "
                   "the call's SETUP, CONNECT and RELEASE into it")
    p.add_argument("--latency-ms", type=int, default=0, help="added to every answer")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered KO")
    p.add_argument("--hang-rate", type=float, default=0.0,
                   help="share of requests executed but answered after --hang-seconds")
    p.add_argument("--hang-seconds", type=float, default=30.0)


def serve(args: argparse.Namespace) -> int:
    """Run the sandbox until SIGINT/SIGTERM."""
    try:
        passwords = lines_from_config(Path(args.config)) if args.config else {}
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        print(f"error: {args.config}: {exc}", flush=True)
        return 2
    sandbox = Sandbox(passwords=passwords, open_lines=not args.closed, notify_url=args.notify,
                      faults=Faults(latency_ms=args.latency_ms, fail_rate=args.fail_rate,
                                    hang_rate=args.hang_rate, hang_seconds=args.hang_seconds))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with running(sandbox, args.host, args.port) as url:
            print(f"keyyo sandbox on {url} ({len(passwords)} Digest lines; requests: "
                  f"{url}/_sandbox/requests)", flush=True)
            await stop.wait()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    return 0
