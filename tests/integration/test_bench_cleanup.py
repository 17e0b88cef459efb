"""A benchmark run against an existing broker deletes the topics it made, and only those."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from deploy.topics import create_topics, topic_names
from devtools.bench_results import bench_broker
from schemas.topics import Topic
from tests.kafka import Broker


def make(bootstrap: str, *names: str) -> None:
    topics = tuple(Topic(n, "test", 1, "delete", None) for n in names)
    asyncio.run(create_topics(bootstrap, "", topics=topics, partitions=1))


@pytest.mark.parametrize("keep", [False, True])
def test_a_run_on_an_existing_broker_deletes_what_it_made(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, keep: bool,
) -> None:
    tag = uuid.uuid4().hex[:6]
    older = f"bench{tag}.keyyo.notifications.v1"  # a bench topic of an earlier run: kept
    make(broker.bootstrap, older)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap)
    again = uuid.uuid4().hex[:6]
    made = [f"bench{again}.keyyo.call-updates.v1", f"bare{again}.bench.call-records.state.changelog",
            f"lat{again}.keyyo.notifications.v1"]
    theirs = f"mine-{tag}.events"  # someone else's topic, made during the run: kept
    with bench_broker(keep) as bootstrap:
        assert bootstrap == broker.bootstrap
        make(bootstrap, *made, theirs)
    left = asyncio.run(topic_names(broker.bootstrap))
    assert {older, theirs} <= left
    assert set(made) <= left if keep else not set(made) & left
