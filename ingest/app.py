"""The aiohttp ingest edge: authenticate, validate, publish durably, then answer.

Routes: ``GET|POST /v1/keyyo/{tenant}/notifications``, the actions API (``POST
/v1/keyyo/{tenant}/actions``, ``GET /v1/keyyo/{tenant}/actions/{action_id}``), ``/healthz``,
``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import secrets as secrets_module
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest.action_results import ActionResults
from ingest.budget import Budgets
from ingest.config import ConfigError, IngestSettings, Tenant
from ingest.metrics import IngestMetrics
from ingest.parsing import ALIASES, SECRET_PARAM, Refusal, parse_notification, query_pairs
from ingest.publisher import Outcome, Publisher
from schemas.actions import ActionInvalid, action_from_request
from schemas.notification import RejectedNotification, rfc3339_ms
from schemas.topics import ACTION_RESULTS, ACTIONS, NOTIFICATIONS, NOTIFICATIONS_REJECTED

log = logging.getLogger("keyyo.ingest")

Clock = Callable[[], int]
"""Milliseconds since the epoch."""

SETTINGS = web.AppKey("settings", IngestSettings)
"""The settings the edge started with; the tenants in use are :data:`TENANTS` (a reload changes
only those), so its ``tenants`` are never read while serving."""
METRICS = web.AppKey("metrics", IngestMetrics)
PUBLISHER = web.AppKey("publisher", Publisher)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
TEMPLATE_WARNED: web.AppKey[set[str]] = web.AppKey("template_warned")
RESULTS = web.AppKey("results", ActionResults)
ACCEPTED: web.AppKey[dict[str, str]] = web.AppKey("accepted")
"""Actions this process accepted and has no result of yet: id -> tenant (bounded)."""
THROTTLED: web.AppKey[dict[str, list[float]]] = web.AppKey("throttled")
"""Per throttled tenant: [when it was last logged (monotonic), requests refused since]."""
THROTTLE_LOG_S = 60.0
"""A throttled tenant is logged at most once per this many seconds (with the count meanwhile)."""

MAX_BODY = 64 * 1024
MAX_QUERY = 8 * 1024
"""A longer query string is refused (414) and kept, clipped; Keyyo's longest is ~700 bytes."""
MAX_REQUEST_LINE = 64 * 1024
"""Past this, aiohttp cannot read the request: a JSON 400 answer, counted, not kept."""
_JSON = "application/json"
_REDACTED = "REDACTED"
_UNKNOWN_TENANT = Tenant("", (bytes(32),))
"""Stands in for an unknown tenant, so its refusal costs and says the same as a wrong key."""
PREVIOUS_KEY_LOG_S = 60.0
"""A tenant still sending a previous key (a rotation under way) is logged at most this often."""


class TenantTable:
    """The tenants and their request budgets, replaced whole when the configuration is read again
    (SIGHUP): a request reads the table once it has its key, so it never sees half of a change."""

    def __init__(self, settings: IngestSettings) -> None:
        self.by_id: dict[str, Tenant] = {}
        self.default_max_per_second = 0.0
        self.budgets = Budgets({})
        self.replace(settings)

    def replace(self, settings: IngestSettings) -> None:
        """Take the tenants of ``settings`` (budgets start full again)."""
        self.by_id = settings.tenants
        self.default_max_per_second = settings.tenant_max_per_second
        self.budgets = Budgets({tid: self.limit(t) for tid, t in settings.tenants.items()})

    def limit(self, tenant: Tenant) -> float:
        """A tenant's requests/s per edge process (0: no limit)."""
        return tenant.max_per_second if tenant.max_per_second is not None else self.default_max_per_second


TENANTS = web.AppKey("tenants", TenantTable)
RELOADING = web.AppKey("reloading", asyncio.Lock)
"""Held while the configuration is read again (one reload at a time)."""
PREVIOUS_KEY: web.AppKey[dict[str, list[float]]] = web.AppKey("previous_key")
"""Per tenant seen with a previous key: [when it was last logged (monotonic), requests since]."""
RELOADABLE = ("tenants", "tenant_max_per_second")
"""The settings a reload applies; the others (Kafka, spool, limits) need a restart."""


def wall_clock_ms() -> int:
    """The default clock."""
    return time.time_ns() // 1_000_000


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


def _redact_pairs(text: str) -> str:
    """A query string or form body with the value of every ``key`` parameter blanked out,
    however its name was encoded (``key``, ``k%65y``, ``ke+y``...)."""
    parts = text.split("&")
    for i, part in enumerate(parts):
        name, sep, _ = part.partition("=")
        if sep and unquote_plus(name) == SECRET_PARAM:
            parts[i] = f"{name}={_REDACTED}"
    return "&".join(parts)


_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _unescape(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))


_JSON_KEY = re.compile(r'"key"\s*:\s*"(?:[^"\\]|\\.)*"')


def redact(text: str | None, secrets: Iterable[str], *, form: bool) -> str | None:
    """``text`` (a query string or a body) without the tenant's secret: ``key`` parameters
    blanked, then every spelling of each secret the request carried replaced, wherever it is."""
    if text is None:
        return None
    if form:
        text = _redact_pairs(text)
    else:  # JSON that did not parse: decode its escapes so none hides the key, then blank it
        text = _JSON_KEY.sub(f'"key":"{_REDACTED}"', _UNICODE_ESCAPE.sub(_unescape, text))
    for secret in secrets:
        if not secret:
            continue
        for spelling in {secret, quote_plus(secret), quote(secret, safe=""), json.dumps(secret)[1:-1]}:
            text = text.replace(spelling, _REDACTED)
    return text


def _json_pairs(raw: bytes) -> list[tuple[str, Any]]:
    """The members of a JSON object body, in order, duplicates kept (so they can be refused)."""
    data = json.loads(raw, object_pairs_hook=lambda pairs: pairs)
    if not isinstance(data, list) or (data and not isinstance(data[0], tuple)):
        raise TypeError("not an object")
    return data


async def _read_body(request: web.Request, timeout_s: float) -> bytes | Refusal:
    """The whole body, up to :data:`MAX_BODY` bytes, however slowly its pieces arrive."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.read(MAX_BODY + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY:
                    return Refusal("invalid_body", None, f"body larger than {MAX_BODY} bytes", status=413)
    except TimeoutError:
        return Refusal("invalid_body", None, f"body not complete within {timeout_s:g} s", status=408)
    return b"".join(chunks)


async def _body_params(
    request: web.Request, timeout_s: float,
) -> tuple[list[tuple[str, str]] | Refusal, str | None, bool]:
    """Parameters from a POST body (form or JSON object), its text, and whether it is a form."""
    raw = await _read_body(request, timeout_s)
    form = request.content_type != _JSON
    if isinstance(raw, Refusal):
        return raw, None, form
    if not raw:
        return [], None, form
    text = raw.decode("utf-8", "replace")
    if form:
        return query_pairs(text), text, form
    try:
        members = _json_pairs(raw)
    except (ValueError, TypeError, RecursionError) as exc:
        detail = f"body is not valid JSON: {exc}" if isinstance(exc, ValueError) else \
            "JSON body must be an object of parameters"
        return Refusal("invalid_body", None, detail[:300]), text, form
    # Kept re-serialised, so no escape sequence can hide the key from the redaction.
    text = "{" + ", ".join(
        f"{json.dumps(name)}: {json.dumps(_REDACTED if name == SECRET_PARAM else value)}"
        for name, value in members) + "}"
    params: list[tuple[str, str]] = []
    for name, value in members:
        if value is None:
            value = ""
        elif isinstance(value, bool) or not isinstance(value, str | int):
            return Refusal("invalid_body", name[:64], "JSON values must be strings or integers"), text, form
        params.append((name, str(value)))
    return params, text, form


async def handle_notification(request: web.Request) -> web.Response:
    """Validate one Keyyo notification and answer 200 only once it is durable."""
    app = request.app
    settings = app[SETTINGS]
    metrics = app[METRICS]
    received_ms = app[CLOCK]()
    tenant_id = request.match_info["tenant"]
    source_ip = request.remote or ""
    raw_query = request.raw_path.partition("?")[2]
    params = query_pairs(raw_query)
    body_text: str | None = None
    form = True
    refusal: Refusal | None = None
    if request.method == "POST":
        parsed, body_text, form = await _body_params(request, settings.body_timeout_seconds)
        if isinstance(parsed, Refusal):
            refusal = parsed  # the key can then only come from the query string
        else:
            params.extend(parsed)
    # The key first, the same answer for an unknown tenant and a wrong key: no enumeration.
    tenants = app[TENANTS]
    tenant = tenants.by_id.get(tenant_id)
    secrets = [v for k, v in params if k == SECRET_PARAM]
    key = (tenant or _UNKNOWN_TENANT).key_index(secrets[0] if len(secrets) == 1 else "")
    if tenant is None or len(secrets) != 1 or key is None:
        metrics.requests["unauthorized"].inc()
        return _json(401, {"error": "unauthorized", "field": SECRET_PARAM,
                           "detail": "unknown tenant, or missing or wrong key"})
    if not tenant.source_allowed(source_ip):
        metrics.requests["forbidden"].inc()
        return _json(403, {"error": "forbidden", "field": None,
                           "detail": f"source address {source_ip} is not allowed for this tenant"})
    if key:
        _previous_key(app, tenant_id, "key")
    if (wait := tenants.budgets.take(tenant_id)) is not None:
        return _throttled(app, tenant_id, wait)
    if refusal is None and len(raw_query) > MAX_QUERY:
        refusal = Refusal("uri_too_long", None, f"query string longer than {MAX_QUERY} bytes", status=414)
    if refusal is None:
        result = parse_notification(
            tenant_id, params, source_ip, received_ms,
            max_ahead_ms=int(settings.max_event_ahead_seconds * 1000),
            max_behind_ms=int(settings.max_event_behind_seconds * 1000))
        if isinstance(result, Refusal):
            refusal = result
        else:
            topic = settings.topic_prefix + NOTIFICATIONS.name
            outcome = await app[PUBLISHER].publish(topic, tenant_id.encode(), result.to_json())
            if outcome is Outcome.UNAVAILABLE:
                metrics.requests["unavailable"].inc()
                return _json(503, {"error": "unavailable", "field": None,
                                   "detail": "Kafka did not take the event in time; retry"},
                             headers={"Retry-After": "1"})
            metrics.requests["accepted" if outcome is Outcome.KAFKA else "spooled"].inc()
            no_tsms = result.event_time == result.received_at and not any(
                value and ALIASES.get(name) == "tsms" for name, value in params)
            if result.dref is None or no_tsms:
                _incomplete_template(app, tenant_id, result.dref is None, no_tsms)
            return _json(200, {"event_id": result.event_id, "stored": outcome.value})
    query = redact(raw_query[:MAX_QUERY], secrets, form=True) or ""
    body = redact(body_text, secrets, form=form)
    return await _refuse(request, tenant_id, source_ip, received_ms, refusal, query, body)


_STILL_USED = {
    "key": "key: its notification URL in the Keyyo Manager is not updated yet",
    "api_token": "actions API token: a client of its actions API still has the old one",
}


def _previous_key(app: web.Application, tenant_id: str, credential: str) -> None:
    """A request with one of the tenant's previous keys or API tokens (a rotation under way):
    counted, and logged at most once a minute per tenant and credential, so the operator knows
    when the old one can go."""
    app[METRICS].previous_key[credential].inc()
    count = _now_and_then(app[PREVIOUS_KEY], f"{tenant_id}/{credential}", PREVIOUS_KEY_LOG_S)
    if count is not None:
        log.warning(f"tenant {tenant_id} still sends a previous {_STILL_USED[credential]}",
                    extra={"tenant": tenant_id, "credential": credential, "requests": count})


def _now_and_then(seen: dict[str, list[float]], tenant_id: str, every_s: float) -> int | None:
    """Count one more event of ``tenant_id``; when it was last said over ``every_s`` ago (or never),
    the events since, to be said now; else None. ``seen``: tenant -> [when said, count since]."""
    entry = seen.setdefault(tenant_id, [-math.inf, 0.0])
    entry[1] += 1
    now = time.monotonic()
    if now - entry[0] < every_s:
        return None
    count = int(entry[1])
    entry[0], entry[1] = now, 0.0
    return count


async def reload_tenants(app: web.Application, load: Callable[[], IngestSettings]) -> bool:
    """Read the configuration again and apply its tenants (keys, sources, budgets); a file with a
    mistake changes nothing (one error line). Settings other than the tenants need a restart: a
    change to them is named in a warning and not applied. The file is read and checked in a
    thread (thousands of tenants take ≈ 0.2 s), so requests go on meanwhile; reloads run one at a
    time. True when applied."""
    metrics = app[METRICS]
    async with app[RELOADING]:
        try:
            new = await asyncio.to_thread(load)
        except ConfigError as exc:
            metrics.reloads["failed"].inc()
            log.error(f"configuration not reloaded, the running one is kept: {exc}")
            return False
        old = app[SETTINGS]
        ignored = [f.name for f in dataclasses.fields(IngestSettings)
                   if f.name not in (*RELOADABLE, "extra") and getattr(new, f.name) != getattr(old, f.name)]
        if ignored:
            log.warning("configuration reloaded except settings that need a restart: " + ", ".join(ignored),
                        extra={"not_applied": ignored})
        before = app[TENANTS].by_id
        app[TENANTS].replace(new)
        metrics.reloads["applied"].inc()
        log.info("configuration reloaded", extra={
            "tenants": len(new.tenants), "added": sorted(new.tenants.keys() - before.keys()),
            "removed": sorted(before.keys() - new.tenants.keys()),
            "changed": sorted(t for t in new.tenants.keys() & before.keys() if new.tenants[t] != before[t])})
        return True


def _throttled(app: web.Application, tenant_id: str, wait_s: float) -> web.Response:
    """429 for a tenant over its budget; counted, and logged at most once a minute per tenant."""
    app[METRICS].requests["throttled"].inc()
    if (count := _now_and_then(app[THROTTLED], tenant_id, THROTTLE_LOG_S)) is not None:
        table = app[TENANTS]
        tenant = table.by_id.get(tenant_id)
        limit = table.limit(tenant) if tenant is not None else 0.0
        log.warning(f"tenant {tenant_id} is over its {limit:g} requests/s: answered 429",
                    extra={"tenant": tenant_id, "limit": limit, "throttled": count})
    return _json(429, {"error": "too_many_requests", "field": None,
                       "detail": f"more than this tenant's requests per second; retry in {wait_s:.1f} s"},
                 headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


def _incomplete_template(app: web.Application, tenant_id: str, no_dref: bool, no_tsms: bool) -> None:
    """Count a notification sent without ``_DREF_`` or ``_TSMS_``; say it once per tenant."""
    metrics = app[METRICS]
    if no_dref:
        metrics.incomplete_template["dref"].inc()
    if no_tsms:
        metrics.incomplete_template["tsms"].inc()
    if tenant_id not in app[TEMPLATE_WARNED]:
        app[TEMPLATE_WARNED].add(tenant_id)
        missing = " and ".join(k for k, m in (("_DREF_", no_dref), ("_TSMS_", no_tsms)) if m)
        log.warning(
            f"tenant {tenant_id}'s notification URL lacks {missing}: "
            + ("its calls are paired by line and numbers, approximately; " if no_dref else "")
            + ("event times are the receive times; " if no_tsms else "")
            + f"paste the template printed by `keyyo-stream url --tenant {tenant_id} --base URL` "
            "into the Keyyo Manager", extra={"tenant": tenant_id, "missing": missing})


async def _refuse(
    request: web.Request, tenant_id: str, source_ip: str, received_ms: int,
    refusal: Refusal, query: str, body_text: str | None,
) -> web.Response:
    """Keep the raw request (secret redacted) in the rejected topic, then answer the refusal."""
    app = request.app
    app[METRICS].requests["rejected"].inc()
    rejected = RejectedNotification(
        tenant=tenant_id, method=request.method, path=request.path[:512],
        query=query, body=body_text, source_ip=source_ip,
        received_at=rfc3339_ms(received_ms), status=refusal.status, error=refusal.error,
        field=refusal.field, detail=refusal.detail,
    )
    topic = app[SETTINGS].topic_prefix + NOTIFICATIONS_REJECTED.name
    outcome = await app[PUBLISHER].publish(topic, tenant_id.encode(), rejected.to_json())
    if outcome is Outcome.UNAVAILABLE:
        app[METRICS].rejected_unrecorded.inc()
        log.error("refused request could not be kept in %s: %s", topic, rejected.to_json().decode())
    return _json(refusal.status, refusal.body())


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _api_tenant(request: web.Request) -> tuple[str, str, web.Response | None]:
    """The tenant of an actions API request and its token, or the 401 answer (the same for an
    unknown tenant, a tenant without API token and a wrong token: no enumeration)."""
    tenant_id = request.match_info["tenant"]
    token = _bearer(request)
    tenant = request.app[TENANTS].by_id.get(tenant_id)
    index = (tenant or _UNKNOWN_TENANT).api_token_index(token)
    if index:
        _previous_key(request.app, tenant_id, "api_token")
    if index is None or tenant is None:
        request.app[METRICS].requests["unauthorized"].inc()
        return tenant_id, token, _json(
            401, {"error": "unauthorized", "field": "Authorization",
                  "detail": "unknown tenant, or missing or wrong API token (Authorization: Bearer <token>)"},
            headers={"WWW-Authenticate": 'Bearer realm="keyyo-stream"'})
    return tenant_id, token, None


async def handle_action_post(request: web.Request) -> web.Response:
    """Validate an action request, write it to the actions topic (acks=all), answer 202 with its id."""
    app = request.app
    settings = app[SETTINGS]
    received_ms = app[CLOCK]()
    tenant_id, token, refused = _api_tenant(request)
    if refused is not None:
        return refused
    if (wait := app[TENANTS].budgets.take(tenant_id)) is not None:
        return _throttled(app, tenant_id, wait)
    raw = await _read_body(request, settings.body_timeout_seconds)
    text: str | None = None
    refusal: Refusal | None = None
    if isinstance(raw, Refusal):
        refusal = raw
    else:
        text = raw.decode("utf-8", "replace")
        try:
            body = orjson.loads(raw)
            action = action_from_request(tenant_id, body, received_ms, request.headers.get("Idempotency-Key"),
                                         secrets_module.token_hex(16))
        except orjson.JSONDecodeError as exc:
            refusal = Refusal("invalid_body", None, f"body is not valid JSON: {exc}"[:300])
        except ActionInvalid as exc:
            refusal = Refusal("invalid_action", exc.field, exc.detail)
    if refusal is not None:
        return await _refuse(request, tenant_id, request.remote or "", received_ms, refusal, "",
                             redact(text, [token], form=False))
    outcome = await app[PUBLISHER].publish(settings.topic_prefix + ACTIONS.name, tenant_id.encode(),
                                           action.to_json())
    if outcome is Outcome.UNAVAILABLE:
        app[METRICS].requests["unavailable"].inc()
        return _json(503, {"error": "unavailable", "field": None,
                           "detail": "Kafka did not take the action in time; retry (with the same "
                                     "Idempotency-Key)"}, headers={"Retry-After": "1"})
    app[METRICS].actions_accepted.labels(action.kind).inc()
    accepted = app[ACCEPTED]
    accepted[action.action_id] = tenant_id
    if len(accepted) > 10_000:
        del accepted[next(iter(accepted))]
    return _json(202, {"action_id": action.action_id, "status": "accepted", "stored": outcome.value})


async def handle_action_get(request: web.Request) -> web.Response:
    """The latest result of one of the tenant's actions."""
    tenant_id, _, refused = _api_tenant(request)
    if refused is not None:
        return refused
    aid = request.match_info["action_id"]
    found = request.app[RESULTS].get(aid)
    if found is not None and found[0] == tenant_id:
        return web.Response(status=200, body=found[1], content_type=_JSON)
    if found is None and request.app[ACCEPTED].get(aid) == tenant_id:
        return _json(200, {"action_id": aid, "tenant": tenant_id, "status": "accepted", "final": False})
    return _json(404, {"error": "not_found", "field": "action_id",
                       "detail": "no such action of this tenant (or its result is not known here yet)"})


async def handle_healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    return _json(200, {"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Readiness: Kafka reachable and the spool below its ready limit."""
    publisher = request.app[PUBLISHER]
    checks = {"kafka": publisher.kafka_ok, "spool": publisher.spool_ready}
    status = 200 if all(checks.values()) else 503
    return _json(status, {"ready": status == 200, "checks": checks})


async def handle_metrics(request: web.Request) -> web.Response:
    """Prometheus exposition."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    publisher = Publisher(
        settings.bootstrap_servers, settings.produce_budget_seconds, app[METRICS],
        linger_ms=settings.linger_ms, spool_dir=settings.spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
        spool_ready_fraction=settings.spool_ready_fraction,
    )
    await publisher.start()
    app[PUBLISHER] = publisher
    results = ActionResults(settings.bootstrap_servers, settings.topic_prefix + ACTION_RESULTS.name,
                            settings.action_results_kept)
    await results.start()
    app[RESULTS] = results
    log.info("ingest ready", extra={"bootstrap": settings.bootstrap_servers,
                                    "tenants": len(settings.tenants)})
    yield
    await results.stop()
    await publisher.stop()  # flushes the producer after the server stopped taking requests


def build_app(settings: IngestSettings, clock: Clock = wall_clock_ms) -> web.Application:
    """The ingest application; its publisher starts and stops with it."""
    app = web.Application(client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[METRICS] = IngestMetrics()
    app[CLOCK] = clock
    app[TEMPLATE_WARNED] = set()
    app[ACCEPTED] = {}
    app[TENANTS] = TenantTable(settings)
    app[RELOADING] = asyncio.Lock()
    app[THROTTLED] = {}
    app[PREVIOUS_KEY] = {}
    app.cleanup_ctx.append(_publisher_ctx)
    route = "/v1/keyyo/{tenant}/notifications"
    app.router.add_get(route, handle_notification, allow_head=False)
    app.router.add_post(route, handle_notification)
    app.router.add_post("/v1/keyyo/{tenant}/actions", handle_action_post)
    app.router.add_get("/v1/keyyo/{tenant}/actions/{action_id}", handle_action_get)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    return app


class _JsonErrorsHandler(RequestHandler):
    """A request aiohttp cannot parse (request line over the limit, malformed HTTP) is answered
    in the documented JSON, logged in one line without the request (it may hold the key), and
    counted; it cannot be kept in the rejected topic since it was never read."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        metrics: IngestMetrics | None = getattr(self._manager, "edge_metrics", None)
        if metrics is not None:
            metrics.requests["malformed"].inc()
        if status >= 500:
            log.error("request failed", extra={"status": status, "error": type(exc).__name__})
        else:
            log.warning("unreadable request refused", extra={
                "status": status, "error": type(exc).__name__, "source_ip": request.remote})
        detail = "request line or headers too long, or not valid HTTP" if status < 500 else "internal error"
        resp = web.Response(status=status, body=orjson.dumps(
            {"error": "bad_request" if status < 500 else "internal_error", "field": None, "detail": detail}),
            content_type=_JSON)
        resp.force_close()
        return resp


class _JsonErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """The edge's runner: aiohttp's own refusals answered in JSON, longer request lines read."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log", None)
        kwargs.setdefault("max_line_size", MAX_REQUEST_LINE)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer  # same object, one method more
        server.edge_metrics = self.app[METRICS]  # type: ignore[attr-defined]
        return server


async def run_edge(settings: IngestSettings, host: str, port: int, stop: asyncio.Event,
                   reuse_port: bool = False, own_port: tuple[str, int] | None = None,
                   reload: Callable[[], IngestSettings] | None = None) -> None:
    """Serve until ``stop`` is set; then stop taking requests, finish those in flight, flush.

    ``own_port`` (host, port): the same app also on a port of this process alone, so one worker
    of several sharing ``port`` can be scraped (``/metrics``) and probed by itself. ``reload``:
    where SIGHUP reads the configuration again (:func:`reload_tenants`).
    """
    app = build_app(settings)
    reloads: set[asyncio.Task[bool]] = set()  # referenced until done

    def on_sighup(load: Callable[[], IngestSettings]) -> None:
        task = asyncio.create_task(reload_tenants(app, load))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    if reload is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup, reload)
    runner = EdgeRunner(app, shutdown_timeout=10.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        if own_port is not None:
            await web.TCPSite(runner, own_port[0], own_port[1]).start()
        log.info("ingest listening", extra={
            "url": f"http://{host}:{port}",
            **({"own_url": f"http://{own_port[0]}:{own_port[1]}/metrics"} if own_port else {})})
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(settings: IngestSettings, host: str, port: int, reuse_port: bool = False,
          own_port: tuple[str, int] | None = None,
          reload: Callable[[], IngestSettings] | None = None) -> None:
    """Run the edge until SIGINT/SIGTERM; then stop taking requests and flush the producer.
    SIGHUP reads the tenants again (``reload``)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_edge(settings, host, port, stop, reuse_port=reuse_port, own_port=own_port,
                       reload=reload)

    asyncio.run(main())
