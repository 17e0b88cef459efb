"""``keyyo-stream tail``: follow a topic and print its records readably."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.metadata import MetadataRequest

SHORT_NAMES = {
    "notifications": "keyyo.notifications.v1",
    "rejected": "keyyo.notifications.rejected.v1",
    "call-updates": "keyyo.call-updates.v1",
    "call-records": "keyyo.call-records.v1",
    "acd-stats": "keyyo.acd-stats.v1",
    "dead-letters": "keyyo.dead-letters.v1",
    "actions": "keyyo.actions.v1",
    "action-results": "keyyo.action-results.v1",
}


def render(value: dict[str, Any]) -> str:
    """One readable line for a known record type; compact JSON otherwise."""
    schema = value.get("schema")
    if schema == "keyyo.notification.v1":
        extra = " ".join(
            f"{k}={value[k]}" for k in ("session_id", "dref_replace", "redirecting_number")
            if value.get(k)
        )
        return (f"{value['event_time']} {value['tenant']:<10} {value['type']:<7} "
                f"line={value['account']} {value['caller'] or '?'} -> {value['callee'] or '?'} "
                f"dref={value['dref']}{' acd' if value.get('is_acd') else ''} {extra}").rstrip()
    if schema == "keyyo.notification-rejected.v1":
        return (f"{value['received_at']} {value['tenant']:<10} REJECTED {value['status']} "
                f"{value['error']} field={value['field']}: {value['detail']}  [{value['query']}]")
    if schema == "keyyo.call-record.v1":
        return (f"{value.get('started_at')} {value.get('tenant'):<10} {value.get('direction'):<8} "
                f"{value.get('outcome'):<9} {value.get('caller')} -> {value.get('callee')} "
                f"answered_by={value.get('answered_by')} wait={value.get('wait_seconds')}s "
                f"talk={value.get('talk_seconds')}s legs={len(value.get('legs', []))} "
                f"rev={value.get('revision')} closed_by={value.get('closed_by')}")
    if schema == "keyyo.call-update.v1":
        return (f"{value.get('updated_at')} {value.get('tenant'):<10} {value.get('state'):<8} "
                f"{value.get('caller')} -> {value.get('callee')} legs={len(value.get('legs', []))}")
    if schema == "keyyo.acd-stats.v1":
        sl = value.get("service_level")
        return (f"{value.get('local_start')} {value.get('tenant'):<10} {value.get('queue')} "
                f"{value.get('interval_minutes')}min offered={value.get('offered')} "
                f"answered={value.get('answered')} abandoned={value.get('abandoned')} "
                f"voicemail={value.get('voicemail')} sl={'-' if sl is None else f'{sl:.0%}'} "
                f"asa={value.get('asa_seconds')}s rev={value.get('revision')}"
                f"{' final' if value.get('final') else ''}")
    if schema == "keyyo.action.v1":
        what = value.get("message") or value.get("profile") or value.get("callee_name") or ""
        return (f"{value.get('created_at')} {value.get('tenant'):<10} {value.get('kind'):<7} "
                f"{value.get('account')} -> {value.get('callee') or '-'} {what!r} "
                f"id={value.get('action_id')} origin={orjson.dumps(value.get('origin')).decode()}")
    if schema == "keyyo.action-result.v1":
        return (f"{value.get('at')} {value.get('tenant'):<10} {value.get('kind'):<7} "
                f"{value.get('status'):<10} attempts={value.get('attempts')} http={value.get('http_status')} "
                f"id={value.get('action_id')} {value.get('reason')}")
    return orjson.dumps(value).decode()


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic`` (empty when it does not exist), from a broker's fresh metadata
    of that topic alone: not every topic's (what a client that names no topic asks for, a weight on
    a shared cluster), and without creating it (where ``auto.create.topics.enable`` is on)."""
    client = consumer._client  # private: no public metadata request
    node = client.get_random_node()
    if node is None:
        raise KafkaConnectionError("no broker known")
    response = await client.send(node, MetadataRequest([topic], allow_auto_topic_creation=False))
    for entry in response.topics:  # (error, name, [is_internal,] partitions): v0 has no is_internal
        if entry[1] == topic and entry[0] == 0:
            return [TopicPartition(topic, p) for p in sorted(part[1] for part in entry[-1])]
    return []


async def tail(
    bootstrap: str, topic: str, prefix: str, from_beginning: bool,
    max_records: int | None, idle_timeout: float | None, raw: bool,
) -> int:
    """Print records until interrupted, ``max_records`` printed, or ``idle_timeout`` idle seconds."""
    name = prefix + SHORT_NAMES.get(topic, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed")
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()  # closed even though it never started (no "unclosed" warning)
        raise
    printed = 0
    try:
        tps = await topic_partitions(consumer, name)
        if not tps:
            raise SystemExit(f"topic {name} does not exist (keyyo-stream topics create)")
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        last = time.monotonic()
        while max_records is None or printed < max_records:
            batch = await consumer.getmany(timeout_ms=500)
            if not batch:
                if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    break
                continue
            last = time.monotonic()
            for record in (r for records in batch.values() for r in records):
                text = record.value.decode() if raw else render(orjson.loads(record.value))
                print(text, flush=True)
                printed += 1
                if max_records is not None and printed >= max_records:
                    break
    finally:
        await consumer.stop()
    return printed
