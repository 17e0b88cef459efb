"""The aiohttp ingest edge: authenticate, validate, publish durably, then answer.

Routes: ``GET|POST /v1/keyyo/{tenant}/notifications``, ``/healthz``, ``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest.config import IngestSettings
from ingest.metrics import IngestMetrics
from ingest.parsing import SECRET_PARAM, Refusal, parse_notification, query_pairs
from ingest.publisher import Outcome, Publisher
from schemas.notification import RejectedNotification, rfc3339_ms
from schemas.topics import NOTIFICATIONS, NOTIFICATIONS_REJECTED

log = logging.getLogger("keyyo.ingest")

Clock = Callable[[], int]
"""Milliseconds since the epoch."""

SETTINGS = web.AppKey("settings", IngestSettings)
METRICS = web.AppKey("metrics", IngestMetrics)
PUBLISHER = web.AppKey("publisher", Publisher)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")

MAX_BODY = 64 * 1024
_JSON = "application/json"


def wall_clock_ms() -> int:
    """The default clock."""
    return time.time_ns() // 1_000_000


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


def _redact(query: str) -> str:
    """The raw query string with the tenant secret blanked out."""
    if SECRET_PARAM + "=" not in query:
        return query
    parts = [
        f"{SECRET_PARAM}=REDACTED" if p.split("=", 1)[0] == SECRET_PARAM else p
        for p in query.split("&")
    ]
    return "&".join(parts)


async def _body_params(request: web.Request) -> tuple[list[tuple[str, str]] | Refusal, str | None]:
    """Parameters from a POST body (form or JSON object), and the raw body text."""
    raw = await request.content.read(MAX_BODY + 1)
    if not raw:
        return [], None
    text = raw[:MAX_BODY].decode("utf-8", "replace")
    if len(raw) > MAX_BODY:
        return Refusal("invalid_body", None, f"body larger than {MAX_BODY} bytes", status=413), text
    if request.content_type != _JSON:
        return query_pairs(text), text
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Refusal("invalid_body", None, f"body is not valid JSON: {exc}"), text
    if not isinstance(data, dict):
        return Refusal("invalid_body", None, "JSON body must be an object of parameters"), text
    params: list[tuple[str, str]] = []
    for name, value in data.items():
        if value is None:
            value = ""
        elif isinstance(value, bool) or not isinstance(value, str | int):
            return Refusal("invalid_body", name, "JSON values must be strings or integers"), text
        params.append((name, str(value)))
    return params, text


async def handle_notification(request: web.Request) -> web.Response:
    """Validate one Keyyo notification and answer 200 only once it is durable."""
    app = request.app
    metrics = app[METRICS]
    received_ms = app[CLOCK]()
    tenant_id = request.match_info["tenant"]
    tenant = app[SETTINGS].tenants.get(tenant_id)
    source_ip = request.remote or ""
    if tenant is None:
        metrics.requests["unauthorized"].inc()
        return _json(401, {"error": "unauthorized", "field": "tenant", "detail": "unknown tenant"})
    if not tenant.source_allowed(source_ip):
        metrics.requests["forbidden"].inc()
        return _json(403, {"error": "forbidden", "field": None,
                           "detail": f"source address {source_ip} is not allowed for this tenant"})

    params = query_pairs(request.raw_path.partition("?")[2])
    body_text: str | None = None
    refusal: Refusal | None = None
    if request.method == "POST":
        parsed, body_text = await _body_params(request)
        if isinstance(parsed, Refusal):
            refusal = parsed  # the key can then only come from the query string
        else:
            params.extend(parsed)
    secrets = [v for k, v in params if k == SECRET_PARAM]
    if len(secrets) != 1 or not tenant.key_matches(secrets[0]):
        metrics.requests["unauthorized"].inc()
        return _json(401, {"error": "unauthorized", "field": SECRET_PARAM,
                           "detail": "missing or wrong key"})
    if refusal is None:
        result = parse_notification(tenant_id, params, source_ip, received_ms)
        if isinstance(result, Refusal):
            refusal = result
        else:
            topic = app[SETTINGS].topic_prefix + NOTIFICATIONS.name
            outcome = await app[PUBLISHER].publish(topic, tenant_id.encode(), result.to_json())
            if outcome is Outcome.UNAVAILABLE:
                metrics.requests["unavailable"].inc()
                return _json(503, {"error": "unavailable", "field": None,
                                   "detail": "Kafka did not take the event in time; retry"},
                             headers={"Retry-After": "1"})
            metrics.requests["accepted" if outcome is Outcome.KAFKA else "spooled"].inc()
            return _json(200, {"event_id": result.event_id, "stored": outcome.value})
    return await _refuse(request, tenant_id, source_ip, received_ms, refusal, body_text)


async def _refuse(
    request: web.Request, tenant_id: str, source_ip: str, received_ms: int,
    refusal: Refusal, body_text: str | None,
) -> web.Response:
    """Keep the raw request in the rejected topic, then answer the refusal."""
    app = request.app
    app[METRICS].requests["rejected"].inc()
    rejected = RejectedNotification(
        tenant=tenant_id, method=request.method, path=request.path,
        query=_redact(request.raw_path.partition("?")[2]), body=body_text, source_ip=source_ip,
        received_at=rfc3339_ms(received_ms), status=refusal.status, error=refusal.error,
        field=refusal.field, detail=refusal.detail,
    )
    topic = app[SETTINGS].topic_prefix + NOTIFICATIONS_REJECTED.name
    outcome = await app[PUBLISHER].publish(topic, tenant_id.encode(), rejected.to_json())
    if outcome is Outcome.UNAVAILABLE:
        app[METRICS].rejected_unrecorded.inc()
        log.error("refused request could not be kept in %s: %s", topic, rejected.to_json().decode())
    return _json(refusal.status, refusal.body())


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
    log.info("ingest ready", extra={"bootstrap": settings.bootstrap_servers,
                                    "tenants": len(settings.tenants)})
    yield
    await publisher.stop()  # flushes the producer after the server stopped taking requests


def build_app(settings: IngestSettings, clock: Clock = wall_clock_ms) -> web.Application:
    """The ingest application; its publisher starts and stops with it."""
    app = web.Application(client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[METRICS] = IngestMetrics()
    app[CLOCK] = clock
    app.cleanup_ctx.append(_publisher_ctx)
    route = "/v1/keyyo/{tenant}/notifications"
    app.router.add_get(route, handle_notification, allow_head=False)
    app.router.add_post(route, handle_notification)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    return app


def serve(settings: IngestSettings, host: str, port: int) -> None:
    """Run the edge until SIGINT/SIGTERM; then stop taking requests and flush the producer."""
    web.run_app(
        build_app(settings), host=host, port=port, access_log=None,
        shutdown_timeout=10.0, print=lambda msg: log.info(msg.strip()),
    )
