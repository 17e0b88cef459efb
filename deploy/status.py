"""``keyyo-stream status``: the pipeline as Kafka sees it, in one look.

The brokers; each declared topic (missing, its partitions, its replication and cleanup policy);
each processor's changelog; and each consumer group of the pipeline (the processors' and the
executor's): its state, its members and how far behind its input it is. Problems that would make a
process misbehave are listed with what to do, and make the exit status 1:

- a declared topic missing (``topics create`` makes it);
- a changelog that is not compacted, or whose partitions differ from its input's (a restore would
  read another partition's state);
- a changelog missing while its group has committed offsets (a process would start from those
  offsets with an empty state);
- fewer action-results partitions than action partitions (the executor refuses to start).

Lag is the committed offset's distance to the input's last stable offset (what a read_committed
consumer can reach), summed over the partitions; a group without committed offsets would start at
the beginning, so its lag counts every record still in the topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest_v1, DescribeGroupsRequest_v2
from aiokafka.protocol.api import Request

from processors.registry import PROCESSORS
from schemas.topics import ACTION_RESULTS, ACTIONS, ALL_TOPICS, Topic

T = TypeVar("T")
EXECUTOR_GROUP = "keyyo.execute-actions"
"""The executor's default group, after the output prefix."""


@dataclass
class TopicStatus:
    """One topic as Kafka has it."""

    name: str
    role: str
    partitions: int
    """0: missing."""
    replication: int = 0
    cleanup_policy: str | None = None


@dataclass
class GroupStatus:
    """One consumer group of the pipeline."""

    name: str
    role: str
    input: str
    state: str
    """Kafka's group state (Stable, Empty, PreparingRebalance, ...), ``Dead`` for a group Kafka
    does not know (never ran, or expired)."""
    members: int
    committed: bool
    """Whether the group has committed offsets for its input."""
    lag: int
    max_lag: int = 0
    max_lag_partition: int | None = None


@dataclass
class Status:
    """What ``keyyo-stream status`` found."""

    bootstrap: str
    brokers: list[str]
    controller: int | None
    topics: list[TopicStatus] = field(default_factory=list)
    groups: list[GroupStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``--format json``)."""
        return asdict(self)


class _DescribeGroups(Request[DescribeGroupsRequest_v1 | DescribeGroupsRequest_v2]):  # type: ignore[misc]
    """DescribeGroups at v1 or v2: aiokafka 0.14 decodes a v3 answer with the v2 layout (it lacks
    v3's authorized operations) and fails, so its admin client's ``describe_consumer_groups``
    cannot read a recent broker's answer."""

    API_KEY = 15

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(self, request_struct_class: type[DescribeGroupsRequest_v1 | DescribeGroupsRequest_v2]
              ) -> DescribeGroupsRequest_v1 | DescribeGroupsRequest_v2:
        return request_struct_class(self._groups)


def expected_groups(prefix: str, groups: dict[str, str]) -> list[tuple[str, str, Topic, str | None]]:
    """(group, role, input topic, changelog) of each stage: the processors' default groups (or
    those ``groups`` names, by processor) and the executor's."""
    out: list[tuple[str, str, Topic, str | None]] = []
    for name, spec in PROCESSORS.items():
        group = groups.get(name) or spec.group(prefix)
        out.append((group, f"process {name}", spec.input, f"{group}.{spec.store}.changelog"))
    executor = groups.get("execute-actions") or f"{prefix}{EXECUTOR_GROUP}"
    out.append((executor, "execute actions", ACTIONS, None))
    return out


async def collect(bootstrap: str, prefix: str = "", groups: dict[str, str] | None = None) -> Status:
    """Ask Kafka; raise ``KafkaError`` (or ``OSError``) when it does not answer."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                                enable_auto_commit=False)
    try:
        await consumer.start()
        cluster = await admin.describe_cluster()
        status = Status(bootstrap, [f"{b['node_id']}@{b['host']}:{b['port']}" for b in cluster["brokers"]],
                        cluster.get("controller_id"))
        stages = expected_groups(prefix, groups or {})
        wanted: list[tuple[str, str]] = [(t.full_name(prefix), "declared") for t in ALL_TOPICS]
        wanted += [(changelog, f"{role}'s changelog") for _, role, _, changelog in stages if changelog]
        topics = await _topics(admin, wanted)
        status.topics = list(topics.values())
        await _groups(admin, consumer, status, stages, prefix, topics)
        _problems(status, stages, prefix, topics)
        return status
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        with contextlib.suppress(Exception):
            await admin.close()


async def _topics(admin: AIOKafkaAdminClient, wanted: list[tuple[str, str]]) -> dict[str, TopicStatus]:
    names = [name for name, _ in wanted]
    described = {d["topic"]: d for d in await admin.describe_topics(names)}
    policies: dict[str, str] = {}
    for response in await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]):
        for resource in response.resources:
            if resource[0] == 0:
                policies[resource[3]] = next((e[1] for e in resource[4] if e[0] == "cleanup.policy"), "")
    out: dict[str, TopicStatus] = {}
    for name, role in wanted:
        d = described.get(name)
        if d is None or d.get("error_code") or not d.get("partitions"):
            out[name] = TopicStatus(name, role, 0)
            continue
        parts = d["partitions"]
        out[name] = TopicStatus(name, role, len(parts), len(parts[0].get("replicas", [])), policies.get(name))
    return out


async def _groups(admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, status: Status,
                  stages: list[tuple[str, str, Topic, str | None]], prefix: str,
                  topics: dict[str, TopicStatus]) -> None:
    for group, role, input_topic, _ in stages:
        name = input_topic.full_name(prefix)
        count = topics[name].partitions if name in topics else 0
        tps = [TopicPartition(name, p) for p in range(count)]
        state, members, offsets = await _retried(functools.partial(_group, admin, group, tps))
        committed_offsets = {tp: meta.offset for tp, meta in offsets.items()
                             if tp.topic == name and meta.offset >= 0}
        lags: dict[int, int] = {}
        if tps:
            ends = await consumer.end_offsets(tps)
            starts = await consumer.beginning_offsets(tps)
            for tp in tps:
                at = committed_offsets.get(tp, starts[tp])
                lags[tp.partition] = max(0, ends[tp] - max(at, starts[tp]))
        worst = max(lags.items(), key=lambda kv: kv[1], default=(None, 0))
        status.groups.append(GroupStatus(group, role, name, state, members, bool(committed_offsets),
                                         sum(lags.values()), worst[1], worst[0] if worst[1] else None))


async def _group(admin: AIOKafkaAdminClient, group: str, tps: list[TopicPartition]
                 ) -> tuple[str, int, dict[TopicPartition, Any]]:
    """A group's state, member count and committed offsets of ``tps``."""
    coordinator = await admin.find_coordinator(group)
    response = await admin._client.send(coordinator, _DescribeGroups([group]))  # private: see _DescribeGroups
    state, members = "Dead", 0
    for entry in response.groups:  # (error, group, state, protocol type, protocol, members)
        if entry[1] == group:
            state, members = entry[2] or "Dead", len(entry[5])
    offsets = await admin.list_consumer_group_offsets(group, group_coordinator_id=coordinator,
                                                      partitions=tps or None)
    return state, members, offsets


async def _retried(ask: Callable[[], Awaitable[T]], within_s: float = 15.0) -> T:
    """``ask()``, again while Kafka answers that it is not ready yet (a new cluster creates its
    offsets topic on the first group request, and has no coordinator until it has)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await ask()
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _problems(status: Status, stages: list[tuple[str, str, Topic, str | None]], prefix: str,
              topics: dict[str, TopicStatus]) -> None:
    out = status.problems
    for t in ALL_TOPICS:
        if topics[t.full_name(prefix)].partitions == 0:
            out.append(f"topic {t.full_name(prefix)} is missing: run `keyyo-stream topics create`")
    groups = {g.name: g for g in status.groups}
    for group, role, input_topic, changelog in stages:
        if changelog is None:
            continue
        log, source = topics[changelog], topics[input_topic.full_name(prefix)]
        if log.partitions == 0:
            if groups[group].committed:
                out.append(f"changelog {changelog} is missing but group {group} has committed offsets: "
                           f"`{role}` would go on from them with an empty state; restore the changelog, "
                           "or reset the group's offsets to replay its input")
            continue
        if log.cleanup_policy is not None and "compact" not in log.cleanup_policy:
            out.append(f"changelog {changelog} is not compacted (cleanup.policy={log.cleanup_policy}): "
                       f"its state would expire; `{role}` sets it at start, or set cleanup.policy=compact")
        if source.partitions and log.partitions != source.partitions:
            out.append(f"changelog {changelog} has {log.partitions} partitions, its input "
                       f"{source.name} {source.partitions}: each input partition's state must be in the "
                       "changelog partition of the same number")
    actions, results = topics[ACTIONS.full_name(prefix)], topics[ACTION_RESULTS.full_name(prefix)]
    if actions.partitions and results.partitions and results.partitions < actions.partitions:
        out.append(f"{results.name} has {results.partitions} partitions, fewer than the {actions.partitions} "
                   f"of {actions.name}: the executor refuses to start (it must have as many)")


def render(status: Status) -> str:
    """The text form: one line per broker list, topic and group, then the problems."""
    lines = [f"kafka {status.bootstrap}: {len(status.brokers)} broker(s) {', '.join(status.brokers)}"
             f" (controller {status.controller})", "", "topics"]
    width = max(len(t.name) for t in status.topics)
    for t in status.topics:
        if t.partitions == 0 and t.role.endswith("changelog"):  # made by the processor's first start
            lines.append(f"  {'not yet':<8} {t.name:<{width}}  {t.role}, made at its first start")
        elif t.partitions == 0:
            lines.append(f"  {'MISSING':<8} {t.name:<{width}}  {t.role}")
        else:
            lines.append(f"  {'ok':<8} {t.name:<{width}}  {t.partitions:>3} partitions, replication "
                         f"{t.replication}, {t.cleanup_policy}  {t.role}")
    lines += ["", "groups"]
    width = max(len(g.name) for g in status.groups)
    for g in status.groups:
        behind = f"lag {g.lag:,}"
        if g.max_lag_partition is not None:
            behind += f" (most: {g.max_lag:,} on partition {g.max_lag_partition})"
        if not g.committed:
            behind += ", nothing committed yet: would start at the beginning"
        lines.append(f"  {g.name:<{width}}  {g.state:<19} {g.members} member(s)  {behind}  [{g.role}]")
    lines.append("")
    if status.problems:
        lines.append(f"{len(status.problems)} problem(s):")
        lines += [f"  - {p}" for p in status.problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)
