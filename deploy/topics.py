"""Topic provisioning: create every declared topic with its partitions and configs (idempotent)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from processors.registry import ProcessorSpec
from schemas.topics import ALL_TOPICS, Topic, changelog

__all__ = ["ALL_TOPICS", "create_topics", "delete_topics", "partition_count", "provision_processor",
           "topic_names"]


@asynccontextmanager
async def _admin(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client of the cluster, closed after use."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def create_topics(
    bootstrap: str,
    prefix: str = "",
    topics: tuple[Topic, ...] = ALL_TOPICS,
    partitions: int | None = None,
    replication: int | None = None,
) -> dict[str, str]:
    """Create the topics that do not exist yet; return ``{name: "created" | "exists"}``.

    ``partitions`` overrides every declared count (tests use small ones). Replication: ``min(3,
    brokers in the cluster)`` unless given, with ``min.insync.replicas`` 2 from 3 replicas (an
    acks=all write then survives one broker down, and never rests on a single copy).
    """
    async with _admin(bootstrap) as admin:
        if replication is None:
            replication = min(3, len((await admin.describe_cluster())["brokers"]))
        durability = {"min.insync.replicas": "2"} if replication >= 3 else {}
        existing = set(await admin.list_topics())
        result: dict[str, str] = {}
        new: list[NewTopic] = []
        for topic in topics:
            name = topic.full_name(prefix)
            if name in existing:
                result[name] = "exists"
                continue
            configs = {"cleanup.policy": topic.cleanup_policy, **durability, **topic.configs}
            new.append(NewTopic(name, partitions or topic.partitions, replication, topic_configs=configs))
            result[name] = "created"
        if new:
            response = await admin.create_topics(new)
            for name, code, message in _errors(response):
                if code == TopicAlreadyExistsError.errno:
                    result[name] = "exists"
                elif code:
                    raise RuntimeError(f"creating topic {name} failed: error {code} {message}")
        return result


def _errors(response: object) -> list[tuple[str, int, str | None]]:
    out: list[tuple[str, int, str | None]] = []
    for entry in getattr(response, "topic_errors", []):
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        out.append((name, code, message))
    return out


async def topic_names(bootstrap: str) -> set[str]:
    """Names of the cluster's topics."""
    async with _admin(bootstrap) as admin:
        return set(await admin.list_topics())


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Delete these topics (their records are gone for good)."""
    async with _admin(bootstrap) as admin:
        for at in range(0, len(names), 100):
            await admin.delete_topics(names[at:at + 100])


async def partition_count(bootstrap: str, topic: str) -> int:
    """Partitions of an existing topic (0 when it does not exist)."""
    async with _admin(bootstrap) as admin:
        described = await admin.describe_topics([topic])
        for entry in described:
            if entry.get("topic") == topic and not entry.get("error_code"):
                return len(entry.get("partitions", []))
        return 0


async def provision_processor(
    bootstrap: str, spec: ProcessorSpec, prefix: str, out_prefix: str, group: str,
    partitions: int | None = None,
) -> None:
    """Topics a processor needs: its input, its declared outputs, and its changelog (as many
    partitions as the input)."""
    name = spec.input.full_name(prefix)
    made = await create_topics(bootstrap, prefix, topics=(spec.input,), partitions=partitions)
    await create_topics(bootstrap, out_prefix, topics=spec.outputs, partitions=partitions)
    # A topic just made has the count it was made with: asking the cluster right away can find
    # no partitions yet (a broker whose metadata lags, seen on a busy broker deleting topics).
    count = (partitions or spec.input.partitions) if made.get(name) == "created" else \
        await partition_count(bootstrap, name)
    if count <= 0:
        raise RuntimeError(f"the input topic {name} has no partitions the cluster reports")
    log_topic = changelog(group, spec.store, count)
    created = await create_topics(bootstrap, "", topics=(log_topic,))
    if created.get(log_topic.name) == "exists":
        replicas = await replication_of(bootstrap, log_topic.name)
        await set_configs(bootstrap, log_topic.name, {
            "cleanup.policy": log_topic.cleanup_policy, **log_topic.configs,
            **({"min.insync.replicas": "2"} if replicas >= 3 else {})})


async def replication_of(bootstrap: str, topic: str) -> int:
    """Replicas of an existing topic's first partition (0 when it does not exist)."""
    async with _admin(bootstrap) as admin:
        for entry in await admin.describe_topics([topic]):
            if entry.get("topic") == topic and not entry.get("error_code") and entry.get("partitions"):
                return len(entry["partitions"][0].get("replicas", []))
        return 0


async def set_configs(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    """Give an existing topic these settings (a changelog created by an older version gets the
    compaction settings of this one). Its other dynamic settings are reset to the broker's."""
    async with _admin(bootstrap) as admin:
        responses = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)])
        for response in responses:
            for resource in response.resources:
                code, message = resource[0], resource[1]
                if code:
                    raise RuntimeError(f"setting the configs of {topic} failed: error {code} {message}")
