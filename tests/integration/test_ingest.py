"""The ingest edge against a real broker: what arrives, what is refused, and where it goes."""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.protocol.metadata import MetadataRequest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.tail import topic_partitions
from deploy.topics import create_topics
from devtools.traffic import answered_incoming, intercepted_incoming
from ingest.parsing import ALIASES
from schemas.notification import rfc3339_ms
from schemas.topics import NOTIFICATIONS
from tests.integration.edge import SECRET, TENANT, running_edge
from tests.kafka import Broker, read_topic, read_values, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")
T = (time.time_ns() // 1_000_000 - 3600_000) // 1000 * 1000
"""An hour ago, whole seconds: within the edge's event-time bounds."""


def validator(name: str) -> jsonschema.Draft202012Validator:
    text = resources.files("schemas").joinpath(f"json/{name}").read_text()
    return jsonschema.Draft202012Validator(json.loads(text))


NOTIFICATION = validator("keyyo.notification.v1.schema.json")
REJECTED = validator("keyyo.notification-rejected.v1.schema.json")


async def test_answered_incoming_call_arrives_keyed_by_tenant(broker: Broker, prefix: str) -> None:
    call = answered_incoming("33123456789", "33612345678", T)
    async with running_edge(broker.bootstrap, prefix) as edge:
        for params in call:
            resp = await edge.notify(params)
            assert resp.status == 200
        records = await read_topic(broker.bootstrap, edge.topic)
    assert [r.key for r in records] == [b"acme"] * 3
    assert len({r.partition for r in records}) == 1
    values = [orjson.loads(r.value) for r in records]
    for value in values:
        NOTIFICATION.validate(value)
    assert [v["type"] for v in values] == ["SETUP", "CONNECT", "RELEASE"]
    assert {(v["tenant"], v["account"], v["caller"], v["callee"], v["dref"], v["callref"])
            for v in values} == {(TENANT, "33123456789", "33612345678", "33123456789",
                                  call[0]["dref"], call[0]["callref"])}
    assert [v["event_time"] for v in values] == [
        rfc3339_ms(T), rfc3339_ms(T + 4000), rfc3339_ms(T + 34000)]
    assert all(v["source_ip"] == "127.0.0.1" and v["dref_replace"] is None for v in values)
    assert len({v["event_id"] for v in values}) == 3


async def test_interception_carries_dref_replace(broker: Broker, prefix: str) -> None:
    call = intercepted_incoming("33123456789", "33123456790", "33612345678", T)
    async with running_edge(broker.bootstrap, prefix) as edge:
        for params in call:
            assert (await edge.notify(params)).status == 200
        values = await read_values(broker.bootstrap, edge.topic)
    by_line = {(v["account"], v["type"]): v for v in values}
    a_dref = by_line[("33123456789", "SETUP")]["dref"]
    pickup = by_line[("33123456790", "SETUP")]
    assert pickup["dref_replace"] == a_dref
    assert (pickup["caller"], pickup["callee"]) == ("33123456790", "33612345678")
    assert sorted(t for (line, t) in by_line if line == "33123456789") == ["RELEASE", "SETUP"]
    for value in values:
        NOTIFICATION.validate(value)


async def test_post_form_and_json_and_keyword_spellings(broker: Broker, prefix: str) -> None:
    call = answered_incoming("33123456789", "33612345678", T)
    keyword_spelled = {("N_TYPE" if k == "type" else k.upper()): v for k, v in call[2].items()}
    async with running_edge(broker.bootstrap, prefix) as edge:
        url = f"/v1/keyyo/{TENANT}/notifications"
        async with edge.client.post(url, data={"key": SECRET, **call[0]}) as resp:
            assert resp.status == 200, await resp.text()
        async with edge.client.post(f"{url}?key={SECRET}", json=call[1]) as resp:
            assert resp.status == 200, await resp.text()
        assert (await edge.notify(keyword_spelled)).status == 200
        values = await read_values(broker.bootstrap, edge.topic)
    assert [v["type"] for v in values] == ["SETUP", "CONNECT", "RELEASE"]


BAD = answered_incoming("33123456789", "33612345678", T)[0]
REFUSALS = [
    ({**BAD, "type": "RING"}, "invalid_field", "type"),
    ({**BAD, "caller": "_CALLER_"}, "unsubstituted_keyword", "caller"),
    ({**BAD, "tsms": "12345"}, "invalid_field", "tsms"),
    ({k: v for k, v in BAD.items() if k != "callee"}, "missing_field", "callee"),
    ({**BAD, "is_acd": "2"}, "invalid_field", "is_acd"),
    ({**BAD, "session_id": "s" * 41}, "invalid_field", "session_id"),
]


async def test_every_refusal_is_answered_and_kept_in_the_rejected_topic(
    broker: Broker, prefix: str,
) -> None:
    async with running_edge(broker.bootstrap, prefix) as edge:
        for params, _, _ in REFUSALS:
            resp = await edge.notify(params)
            assert resp.status == 400
        query = f"key={SECRET}&" + urlencode(BAD) + "&N_TYPE=SETUP"
        async with edge.client.get(f"/v1/keyyo/{TENANT}/notifications?{query}") as resp:
            assert resp.status == 400
            assert await resp.json() == {
                "error": "repeated_parameter", "field": "type",
                "detail": "parameter 'type' is given more than once"}
        async with edge.client.post(f"/v1/keyyo/{TENANT}/notifications?key={SECRET}",
                                    data=b"[1,2]", headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "invalid_body"
        rejected = await read_values(broker.bootstrap, edge.rejected_topic)
        accepted = await read_topic(broker.bootstrap, edge.topic)
    assert accepted == []
    assert [(r["error"], r["field"]) for r in rejected] == [
        *[(e, f) for _, e, f in REFUSALS], ("repeated_parameter", "type"), ("invalid_body", None)]
    for record in rejected:
        REJECTED.validate(record)
        assert record["tenant"] == TENANT and record["status"] == 400
        assert SECRET not in record["query"] and "key=REDACTED" in record["query"]
        assert record["source_ip"] == "127.0.0.1"
    assert "type=RING" in rejected[0]["query"] and rejected[0]["method"] == "GET"
    assert rejected[-1]["body"] == "[1,2]" and rejected[-1]["method"] == "POST"


async def test_unauthorised_and_forbidden_requests_go_nowhere(broker: Broker, prefix: str) -> None:
    params = answered_incoming("33123456789", "33612345678", T)[0]
    async with running_edge(broker.bootstrap, prefix) as edge:
        assert (await edge.notify(params, tenant="nobody")).status == 401
        assert (await edge.notify(params, key="wrong")).status == 401
        assert (await edge.notify(params, key=None)).status == 401
        assert (await edge.notify({**params, "type": "RING"}, key="wrong")).status == 401
        resp = await edge.notify(params, tenant="locked")
        assert resp.status == 403
        assert (await edge.notify(params)).status == 200  # the one that counts
        values = await read_values(broker.bootstrap, edge.topic)
        rejected = await read_topic(broker.bootstrap, edge.rejected_topic)
        status, metrics = await edge.get("/metrics")
    assert len(values) == 1 and rejected == []
    assert status == 200
    assert 'keyyo_ingest_requests_total{outcome="unauthorized"} 4.0' in metrics
    assert 'keyyo_ingest_requests_total{outcome="forbidden"} 1.0' in metrics
    assert 'keyyo_ingest_requests_total{outcome="accepted"} 1.0' in metrics
    assert "keyyo_ingest_produce_seconds_count 1.0" in metrics


async def test_health_and_readiness(broker: Broker, prefix: str) -> None:
    async with running_edge(broker.bootstrap, prefix) as edge:
        assert await edge.get("/healthz") == (200, {"status": "ok"})
        assert await edge.get("/readyz") == (200, {"ready": True,
                                                   "checks": {"kafka": True, "spool": True}})


async def test_the_readiness_probe_never_asks_for_the_whole_clusters_metadata(
        broker: Broker, prefix: str) -> None:
    # The probe runs every second. Asking for every topic's metadata each time made the edge parse
    # (and its garbage collector walk) every partition of a shared cluster.
    asked: list[list[str] | None] = []  # the topics each metadata request named (None: all)
    async with running_edge(broker.bootstrap, prefix) as edge:
        client = edge.publisher._producer.client
        update, send = client._metadata_update, client.send

        async def update_spy(cluster: Any, topics: Any) -> Any:
            asked.append(sorted(topics) if topics else None)
            return await update(cluster, topics)

        async def send_spy(node_id: Any, request: Any, **kwargs: Any) -> Any:
            if isinstance(request, MetadataRequest):
                asked.append(None if request._topics is None else sorted(request._topics))
            return await send(node_id, request, **kwargs)

        client._metadata_update, client.send = update_spy, send_spy
        await wait_for(lambda: len(asked) >= 2, 15, interval=0.1, what="two probes while idle")
        assert None not in asked, "the idle edge asked for every topic's metadata"
        call = answered_incoming("33123456789", "33612345678", T)
        assert (await edge.notify(call[0])).status == 200
        await wait_for(lambda: asked.count([edge.topic]) >= 2, 15, interval=0.1,
                       what="two probes after the first write")
        assert await edge.get("/readyz") == (200, {"ready": True,
                                                   "checks": {"kafka": True, "spool": True}})
    assert None not in asked
    assert asked.count([edge.topic]) >= 2  # the probe still refreshes what the edge writes to


async def test_a_topics_partitions_are_read_from_that_topics_metadata_alone(
        broker: Broker, prefix: str) -> None:
    # What the edge's follower of action results (and tail, report, the tests) reads partitions with.
    await create_topics(broker.bootstrap, prefix, partitions=3)
    topic = prefix + NOTIFICATIONS.name
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        assert await topic_partitions(consumer, topic) == [TopicPartition(topic, p) for p in range(3)]
        assert await topic_partitions(consumer, prefix + "no.such.topic") == []
        assert consumer._client.cluster.topics() == set()  # no other topic's metadata was fetched
    finally:
        await consumer.stop()


query_values = st.one_of(st.text(max_size=40), st.sampled_from(["SETUP", "", "1", "_DREF_"]),
                         st.from_regex(r"[0-9]{1,14}", fullmatch=True))
query_names = st.one_of(st.sampled_from(sorted(ALIASES)), st.text(min_size=1, max_size=10))


async def test_no_query_string_produces_a_server_error(broker: Broker, prefix: str) -> None:
    statuses: list[int] = []
    async with running_edge(broker.bootstrap, prefix) as edge:

        @settings(max_examples=60, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.lists(st.tuples(query_names, query_values), max_size=14), st.booleans())
        def build(pairs: list[tuple[str, str]], with_base: bool) -> None:
            base = list(BAD.items()) if with_base else []
            cases.append(urlencode([("key", SECRET), *base, *pairs]))

        cases: list[str] = []
        build()
        for query in cases:
            async with edge.client.get(f"/v1/keyyo/{TENANT}/notifications?{query}") as resp:
                statuses.append(resp.status)
                await resp.read()
    assert statuses and all(s in (200, 400) for s in statuses), sorted(set(statuses))
