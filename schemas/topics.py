"""Every Kafka topic of keyyo-stream, declared once: name, key, partitions, cleanup policy, schema."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Topic:
    """A topic declaration; ``name`` is the base name, a deployment may prefix it."""

    name: str
    """Base name, e.g. ``keyyo.notifications.v1``."""
    key: str
    """What the record key holds."""
    partitions: int
    """Partition count created by ``keyyo-stream topics create``."""
    cleanup_policy: str
    """``delete`` or ``compact``."""
    schema: str | None
    """File name of the value's JSON Schema in ``schemas/json``, if it has one."""
    configs: dict[str, str] = field(default_factory=dict)
    """Extra topic configs (retention and the like)."""

    def full_name(self, prefix: str = "") -> str:
        """The topic name under a deployment prefix."""
        return f"{prefix}{self.name}"


DAY_MS = 24 * 3600 * 1000

NOTIFICATIONS = Topic(
    name="keyyo.notifications.v1",
    key="tenant",
    partitions=12,
    cleanup_policy="delete",
    schema="keyyo.notification.v1.schema.json",
    configs={"retention.ms": str(365 * DAY_MS)},
)
NOTIFICATIONS_REJECTED = Topic(
    name="keyyo.notifications.rejected.v1",
    key="tenant",
    partitions=3,
    cleanup_policy="delete",
    schema="keyyo.notification-rejected.v1.schema.json",
    configs={"retention.ms": str(30 * DAY_MS)},
)
CALL_UPDATES = Topic(
    name="keyyo.call-updates.v1",
    key="tenant",
    partitions=12,
    cleanup_policy="delete",
    schema="keyyo.call-update.v1.schema.json",
    configs={"retention.ms": str(1 * DAY_MS)},
)
CALL_RECORDS = Topic(
    name="keyyo.call-records.v1",
    key="tenant",
    partitions=12,
    cleanup_policy="delete",
    schema="keyyo.call-record.v1.schema.json",
    configs={"retention.ms": str(365 * DAY_MS)},
)
DEAD_LETTERS = Topic(
    name="keyyo.dead-letters.v1",
    key="source topic:partition:offset",
    partitions=3,
    cleanup_policy="delete",
    schema="keyyo.dead-letter.v1.schema.json",
    configs={"retention.ms": str(30 * DAY_MS)},
)

ACD_STATS = Topic(
    name="keyyo.acd-stats.v1",
    key="tenant|queue|interval_start",
    partitions=12,
    cleanup_policy="compact,delete",
    schema="keyyo.acd-stats.v1.schema.json",
    # Compaction keeps the latest figures of each interval; deletion forgets intervals after 2 years.
    configs={"retention.ms": str(730 * DAY_MS), "min.compaction.lag.ms": str(3600 * 1000),
             "segment.ms": str(DAY_MS)},
)

ACTIONS = Topic(
    name="keyyo.actions.v1",
    key="tenant",
    partitions=12,
    cleanup_policy="delete",
    schema="keyyo.action.v1.schema.json",
    configs={"retention.ms": str(7 * DAY_MS)},
)
ACTION_RESULTS = Topic(
    name="keyyo.action-results.v1",
    key="action_id",
    # The executor writes an action's results to the partition of the action itself, so that a
    # partition's results are the journal it reads back (same count as keyyo.actions.v1).
    partitions=12,
    cleanup_policy="compact,delete",
    schema="keyyo.action-result.v1.schema.json",
    # Kept well past the actions' own retention: an action read again is never sent again.
    configs={"retention.ms": str(30 * DAY_MS), "segment.ms": str(DAY_MS),
             "min.compaction.lag.ms": str(3600 * 1000)},
)

ALL_TOPICS: tuple[Topic, ...] = (
    NOTIFICATIONS, NOTIFICATIONS_REJECTED, CALL_UPDATES, CALL_RECORDS, DEAD_LETTERS, ACD_STATS,
    ACTIONS, ACTION_RESULTS,
)


CHANGELOG_CONFIGS: dict[str, str] = {
    # Compaction only ever cleans closed segments: roll them often, so a changelog's size follows
    # the live state rather than the traffic, and a restore replays little more than the state.
    "segment.ms": str(10 * 60 * 1000),
    "segment.bytes": str(64 * 1024 * 1024),
    "min.cleanable.dirty.ratio": "0.1",
    "min.compaction.lag.ms": "0",
    "max.compaction.lag.ms": str(3600 * 1000),
    # Tombstones are kept a day: a local checkpoint older than that is not trusted (the runtime
    # ignores checkpoints older than 20 h).
    "delete.retention.ms": str(DAY_MS),
}
"""Changelog topic settings (README, *Restore and checkpoints*)."""


def changelog(group: str, store: str, partitions: int) -> Topic:
    """The compacted changelog of a processor's state store: one partition per input partition."""
    return Topic(
        name=f"{group}.{store}.changelog",
        key="state key",
        partitions=partitions,
        cleanup_policy="compact",
        schema=None,
        configs=dict(CHANGELOG_CONFIGS),
    )
