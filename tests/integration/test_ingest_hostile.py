"""The edge against hostile or clumsy senders: whole values, secrets kept secret, one answer
shape for every refusal, nothing that tells tenants apart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from urllib.parse import urlencode

import orjson
import pytest

from devtools.traffic import answered_incoming
from tests.integration.edge import SECRET, TENANT, Edge, running_edge, tenants
from tests.kafka import Broker, read_values

pytestmark = pytest.mark.asyncio(loop_scope="session")
T = (time.time_ns() // 1_000_000 - 60_000) // 1000 * 1000
CALL = answered_incoming("33123456789", "33612345678", T)[0]
PATH = f"/v1/keyyo/{TENANT}/notifications"


async def raw_request(edge: Edge, pieces: list[bytes], pause_s: float) -> tuple[int, bytes]:
    """Send an HTTP request in ``pieces`` (separate TCP segments), ``pause_s`` apart."""
    server = edge.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(pause_s)
            writer.write(piece)
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        return status, await reader.readexactly(length)
    finally:
        writer.close()


def form_post(body: bytes, query: str = "") -> bytes:
    return (f"POST {PATH}{query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()


async def test_a_body_arriving_in_slow_pieces_is_stored_whole(broker: Broker, prefix: str) -> None:
    body = urlencode({"key": SECRET, **CALL}).encode()
    cut = body.index(b"caller=") + len(b"caller=3")  # the caller's first digit alone, then the rest
    async with running_edge(broker.bootstrap, prefix) as edge:
        status, answer = await raw_request(edge, [form_post(body), body[:cut], body[cut:]], 0.3)
        [stored] = await read_values(broker.bootstrap, edge.topic)
    assert status == 200, answer
    assert stored["caller"] == CALL["caller"] == "33612345678"


async def test_a_body_that_never_completes_is_refused_in_json(broker: Broker, prefix: str) -> None:
    body = urlencode(CALL).encode()
    async with running_edge(broker.bootstrap, prefix, body_timeout_seconds=0.5) as edge:
        status, answer = await raw_request(edge, [form_post(body, f"?key={SECRET}") + body[:20]], 0)
        keyless, _ = await raw_request(edge, [form_post(body) + body[:20]], 0)
        [kept] = await read_values(broker.bootstrap, edge.rejected_topic)
    assert keyless == 401  # the key could only be in the body that never came: kept nowhere
    assert status == 408
    assert orjson.loads(answer)["error"] == "invalid_body"
    assert kept["status"] == 408 and SECRET not in orjson.dumps(kept).decode()


async def test_the_key_is_redacted_however_it_was_passed(broker: Broker, prefix: str) -> None:
    wrong = {**CALL, "type": "RING"}  # refused for another reason than the key: kept
    encoded_value = "".join(f"%{b:02X}" for b in SECRET.encode())
    async with running_edge(broker.bootstrap, prefix) as edge:
        queries = [f"k%65y={SECRET}&{urlencode(wrong)}",
                   f"key={encoded_value}&{urlencode(wrong)}",
                   f"ke%79={encoded_value}&{urlencode(wrong)}&KEY={SECRET}"]
        for query in queries:
            async with edge.client.get(f"{PATH}?{query}") as resp:
                assert resp.status == 400, await resp.text()
        async with edge.client.post(PATH, data={"key": SECRET, **wrong}) as resp:
            assert resp.status == 400
        async with edge.client.post(PATH, json={"key": SECRET, **wrong}) as resp:
            assert resp.status == 400
        escaped = json.dumps({"\\u006bey": SECRET, **wrong}).replace(SECRET, "\\u0073" + SECRET[1:])
        async with edge.client.post(PATH, data=escaped.replace("\\\\", "\\"),
                                    headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400, await resp.text()
        async with edge.client.post(f"{PATH}?key={SECRET}", data=f'{{"key": "{SECRET}", "type": ',
                                    headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400  # the body is not JSON; the key in it is still secret
        broken = '{"\\u006bey": "\\u0073' + SECRET[1:] + '", "type": '
        async with edge.client.post(f"{PATH}?key={SECRET}", data=broken,
                                    headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
        kept = await read_values(broker.bootstrap, edge.rejected_topic)
    assert len(kept) == 8
    for record in kept:
        text = orjson.dumps(record).decode()
        assert SECRET not in text and encoded_value not in text and SECRET[1:] not in text, text
        assert "REDACTED" in text


async def test_long_urls_get_json_answers_and_never_log_the_key(
    broker: Broker, prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    long_query = f"key={SECRET}&{urlencode(CALL)}&pad={'x' * 20_000}"
    huge_query = f"key={SECRET}&{urlencode(CALL)}&pad={'x' * 100_000}"
    caplog.set_level(logging.DEBUG)
    async with running_edge(broker.bootstrap, prefix) as edge:
        async with edge.client.get(f"{PATH}?{long_query}") as resp:
            long_answer = (resp.status, await resp.json())
        status, body = await raw_request(
            edge, [f"GET {PATH}?{huge_query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()], 0)
        [kept] = await read_values(broker.bootstrap, edge.rejected_topic)
        _, metrics = await edge.get("/metrics")
    assert long_answer == (414, {"error": "uri_too_long", "field": None,
                                 "detail": "query string longer than 8192 bytes"})
    assert kept["status"] == 414 and len(kept["query"]) <= 8192 and SECRET not in kept["query"]
    assert status == 400 and orjson.loads(body) == {
        "error": "bad_request", "field": None,
        "detail": "request line or headers too long, or not valid HTTP"}
    assert 'keyyo_ingest_requests_total{outcome="malformed"} 1.0' in metrics
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in caplog.records)
    assert SECRET not in logged and "pad=" not in logged


async def test_a_repeated_json_member_is_refused_like_a_repeated_parameter(
    broker: Broker, prefix: str,
) -> None:
    members = ",".join(f'"{k}": "{v}"' for k, v in {"key": SECRET, **CALL}.items())
    body = "{" + members + ', "type": "RELEASE"}'
    async with running_edge(broker.bootstrap, prefix) as edge, \
            edge.client.post(PATH, data=body, headers={"Content-Type": "application/json"}) as resp:
        answer = (resp.status, await resp.json())
    assert answer == (400, {"error": "repeated_parameter", "field": "type",
                            "detail": "parameter 'type' is given more than once"})


async def test_unknown_tenant_and_wrong_key_look_alike_and_the_key_is_checked_first(
    broker: Broker, prefix: str,
) -> None:
    async with running_edge(broker.bootstrap, prefix) as edge:
        answers = []
        for tenant, key in (("nobody", SECRET), (TENANT, "wrong"), ("nobody", "wrong"), (TENANT, None),
                            ("locked", "wrong")):
            query = {**({"key": key} if key else {}), **CALL}
            async with edge.client.get(f"/v1/keyyo/{tenant}/notifications", params=query) as resp:
                answers.append((resp.status, await resp.read()))
        async with edge.client.get("/v1/keyyo/locked/notifications",
                                   params={"key": SECRET, **CALL}) as resp:
            locked = resp.status
    assert len(set(answers)) == 1 and answers[0][0] == 401
    assert locked == 403  # the right key, from an address the tenant does not allow


async def test_a_noisy_tenant_is_held_to_its_budget_and_slows_no_other(broker: Broker, prefix: str) -> None:
    """acme may send 5 requests/s (a burst of 10), the others 1,000/s. A flood with acme's name
    but a wrong key spends nothing of acme's budget; acme's own flood is answered 429 past its
    burst, while globex, on the same edge, gets every request through; the topic holds exactly
    the 200s."""
    limited = {**tenants(), TENANT: dataclasses.replace(tenants()[TENANT], max_per_second=5)}
    async with running_edge(broker.bootstrap, prefix, tenants=limited, tenant_max_per_second=1000) as edge:
        for _ in range(30):
            assert (await edge.notify(CALL, key="wrong")).status == 401
        answers = []
        for i in range(30):
            async with edge.client.get(f"/v1/keyyo/{TENANT}/notifications",
                                       params={"key": SECRET, **CALL, "callref": str(i)}) as resp:
                answers.append((resp.status, resp.headers.get("Retry-After"), await resp.json()))
            assert (await edge.notify({**CALL, "callref": str(i)}, tenant="globex")).status == 200
        metrics = (await edge.get("/metrics"))[1]
    statuses = [status for status, _, _ in answers]
    accepted = statuses.count(200)
    assert 10 <= accepted <= 12 and statuses[:10] == [200] * 10  # the burst, and what refilled meanwhile
    assert statuses.count(429) == 30 - accepted
    throttled = [(retry, body) for status, retry, body in answers if status == 429]
    assert all(retry == "1" and body["error"] == "too_many_requests" for retry, body in throttled)
    values = await read_values(broker.bootstrap, edge.topic)
    assert sum(1 for v in values if v["tenant"] == TENANT) == accepted
    assert sum(1 for v in values if v["tenant"] == "globex") == 30
    assert f'keyyo_ingest_requests_total{{outcome="throttled"}} {30 - accepted}.0' in metrics
