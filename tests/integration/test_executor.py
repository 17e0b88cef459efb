"""The executor on a real broker against the Keyyo sandbox: each answer Keyyo can give, the rate
limit, expiry, duplicates, and a restart that finds an attempt without a result."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from deploy.topics import create_topics
from devtools.sandbox import Faults, Sandbox, running
from devtools.simulate import wall_ms
from processors.executor import Executor, ExecutorMetrics, ExecutorSettings
from processors.keyyo_api import ExecutorConfig
from schemas.actions import SENDING, Action, action_id, result
from schemas.notification import rfc3339_ms
from schemas.topics import ACTION_RESULTS, ACTIONS
from tests.kafka import Broker, read_values, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")
LINES = [f"3310000{i:04d}" for i in range(6)]
PASSWORDS = {line: f"pw-{line}" for line in LINES}


def sms(n: int, line: str = LINES[0], *, tenant: str = "acme", expires_in_ms: int = 600_000,
        not_before: int | None = None) -> Action:
    now = wall_ms()
    return Action(action_id=action_id(tenant, "test", str(n)), tenant=tenant, kind="sms", account=line,
                  callee=f"3361234{n:04d}", caller=None, callee_name=None, message=f"message {n}",
                  profile=None, not_before=rfc3339_ms(not_before or now),
                  expires_at=rfc3339_ms(now + expires_in_ms),
                  origin={"test": n}, created_at=rfc3339_ms(now))


async def publish(bootstrap: str, prefix: str, actions: list[Action]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for a in actions:
            await producer.send_and_wait(ACTIONS.full_name(prefix), a.to_json(), key=a.tenant.encode())
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def executor(bootstrap: str, prefix: str, base_url: str, **config: Any) -> AsyncIterator[Executor]:
    settings = ExecutorSettings(bootstrap=bootstrap, group=f"{prefix}keyyo.execute-actions",
                                actions_topic=ACTIONS.full_name(prefix),
                                results_topic=ACTION_RESULTS.full_name(prefix))
    ex = Executor(settings, ExecutorConfig(base_url=base_url, passwords=PASSWORDS, **config),
                  ExecutorMetrics(settings.group))
    task = asyncio.create_task(ex.run())
    try:
        yield ex
    finally:
        ex.stop()
        await asyncio.wait_for(task, 60)


async def final_results(bootstrap: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Latest result per action; statuses in the order written, per action, checked for sense."""
    latest: dict[str, dict[str, Any]] = {}
    for r in await read_values(bootstrap, ACTION_RESULTS.full_name(prefix)):
        prev = latest.get(r["action_id"])  # type: ignore[arg-type]
        assert prev is None or not prev["final"], f"a result after a final one: {prev} then {r}"
        latest[r["action_id"]] = r  # type: ignore[index]
    return latest


async def test_answers_rate_limit_expiry_and_duplicates(broker: Broker, prefix: str) -> None:
    await create_topics(broker.bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=3)
    sb = Sandbox(passwords=PASSWORDS, open_lines=False)
    four = [sms(i, LINES[0]) for i in range(4)]  # one line: four requests, a second apart
    other = [sms(10 + i, LINES[1]) for i in range(2)]
    expired = sms(20, LINES[2], expires_in_ms=-1000)
    no_credentials = sms(21, "33999999999")
    async with running(sb) as url:
        # Every action once, and the first one twice more (a duplicate, as an API retry would be).
        await publish(broker.bootstrap, prefix, [*four, four[0], *other, expired, no_credentials, four[0]])
        async with executor(broker.bootstrap, prefix, url) as ex:
            async def done() -> bool:
                got = await final_results(broker.bootstrap, prefix)
                return len(got) == 8 and all(r["final"] for r in got.values())

            await wait_for(done, 60, interval=0.3, what="a final result for every action")
            assert ex.readiness() == {"joined": True, "restored": True, "progressing": True}
    got = await final_results(broker.bootstrap, prefix)
    statuses = {a.action_id: got[a.action_id]["status"] for a in [*four, *other, expired, no_credentials]}
    assert [statuses[a.action_id] for a in four + other] == ["sent"] * 6
    assert statuses[expired.action_id] == "expired" and statuses[no_credentials.action_id] == "rejected"
    executed = [r for r in sb.requests if r["executed"]]
    # each SMS once
    assert sorted(r["params"]["MSG"] for r in executed) == sorted(a.message for a in four + other)
    assert not [r for r in sb.requests if r["status"] == 500], "the executor went past 1 request/s"
    times = [r["at"] for r in executed if r["account"] == LINES[0]]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    # The two lines were served side by side, not one after the other.
    first_other = min(r["at"] for r in executed if r["account"] == LINES[1])
    assert first_other < times[1]


async def test_unknown_is_never_retried_and_come_back_later_is(broker: Broker, prefix: str) -> None:
    await create_topics(broker.bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=3)
    sb = Sandbox(passwords=PASSWORDS, faults=Faults(hang_rate=1.0, hang_seconds=3.0))
    hung = sms(1, LINES[0])
    async with running(sb) as url:
        await publish(broker.bootstrap, prefix, [hung])
        async with executor(broker.bootstrap, prefix, url, timeout_s=1.0):
            async def settled() -> bool:
                got = await final_results(broker.bootstrap, prefix)
                return bool(got.get(hung.action_id, {}).get("final"))

            await wait_for(settled, 30, interval=0.2, what="the hung SMS settled")
            # Keyyo takes requests again, and the line is busy with another client: 500 Come Back Later
            sb.faults = Faults()
            sb.last_accepted[LINES[1]] = 1e12  # far in the future: every request refused for now
            retried = sms(2, LINES[1])
            await publish(broker.bootstrap, prefix, [retried])
            await wait_for(lambda: len([r for r in sb.requests if r["status"] == 500]) >= 2, 30,
                           what="two Come Back Later")
            sb.last_accepted.clear()

            async def sent() -> bool:
                r = (await final_results(broker.bootstrap, prefix)).get(retried.action_id)
                return r is not None and r["status"] == "sent"

            await wait_for(sent, 30, interval=0.2, what="the refused SMS sent after its retries")
    got = await final_results(broker.bootstrap, prefix)
    assert got[hung.action_id]["status"] == "unknown" and got[hung.action_id]["attempts"] == 1
    assert "may have been executed" in got[hung.action_id]["reason"]
    assert got[retried.action_id]["attempts"] >= 3
    # one request (after the Digest challenge), never repeated
    assert [r["status"] for r in sb.requests if r["params"].get("MSG") == hung.message] == [401, 200]
    assert [r["executed"] for r in sb.requests if r["params"].get("MSG") == retried.message][-1] is True


async def test_an_attempt_without_a_result_is_reported_unknown_after_a_restart(
    broker: Broker, prefix: str,
) -> None:
    """What a SIGKILL between `sending` and the request's answer leaves: never sent again."""
    await create_topics(broker.bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=1)
    sb = Sandbox(passwords=PASSWORDS)
    started = sms(1, LINES[0])
    profile = Action(**{**orjson.loads(sms(2, LINES[1]).to_json()), "kind": "profile", "callee": None,
                        "message": None, "profile": "Fermé", "action_id": action_id("acme", "p")})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:  # the journal a killed executor leaves: `sending` written, no result after it
        for a in (started, profile):
            await producer.send_and_wait(ACTION_RESULTS.full_name(prefix), result(
                a, SENDING, wall_ms(), reason="request leaving", attempts=1, offset=0),
                key=a.action_id.encode(), partition=0)
    finally:
        await producer.stop()
    async with running(sb) as url:
        await publish(broker.bootstrap, prefix, [started, profile])
        async with executor(broker.bootstrap, prefix, url):
            async def settled() -> bool:
                got = await final_results(broker.bootstrap, prefix)
                return all(got.get(a.action_id, {}).get("final") for a in (started, profile))

            await wait_for(settled, 30, interval=0.2, what="both settled")
    got = await final_results(broker.bootstrap, prefix)
    assert got[started.action_id]["status"] == "unknown"
    assert got[profile.action_id]["status"] == "sent"  # a profile switch is idempotent: sent again
    assert [r["kind"] for r in sb.requests if r["executed"]] == ["profile"]


async def test_ip_source_lines_and_a_results_topic_too_small(broker: Broker, prefix: str) -> None:
    """IP-source auth sends without credentials; a results topic with fewer partitions than the
    actions (it could not be the journal) stops the executor with one clear reason."""
    await create_topics(broker.bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=2)
    sb = Sandbox(passwords={})  # every line accepted by its source address
    a = sms(1, "33999999999")
    async with running(sb) as url:
        await publish(broker.bootstrap, prefix, [a])
        async with executor(broker.bootstrap, prefix, url, auth="ip"):
            async def sent() -> bool:
                got = await final_results(broker.bootstrap, prefix)
                return bool(got.get(a.action_id, {}).get("status") == "sent")

            await wait_for(sent, 30, interval=0.2, what="the SMS sent by IP source")
    assert [r["status"] for r in sb.requests] == [200]  # no challenge round trip
    small = prefix + "small."
    await create_topics(broker.bootstrap, small, topics=(ACTIONS,), partitions=3)
    await create_topics(broker.bootstrap, small, topics=(ACTION_RESULTS,), partitions=1)
    settings = ExecutorSettings(bootstrap=broker.bootstrap, group=f"{small}g",
                                actions_topic=ACTIONS.full_name(small),
                                results_topic=ACTION_RESULTS.full_name(small))
    ex = Executor(settings, ExecutorConfig(), ExecutorMetrics(settings.group))
    with pytest.raises(RuntimeError, match="fewer than the 3"):
        await asyncio.wait_for(ex.run(), 30)


async def test_a_slow_line_holds_up_no_other(broker: Broker, prefix: str) -> None:
    await create_topics(broker.bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=1)
    slow, fast = LINES[0], LINES[1]
    sb = Sandbox(passwords=PASSWORDS, faults=Faults(slow_accounts={slow: 3.0}))
    # one partition: the slow line's actions come first in it
    actions = [sms(1, slow), sms(2, slow), sms(3, fast), sms(4, fast), sms(5, fast)]
    async with running(sb) as url:
        await publish(broker.bootstrap, prefix, actions)
        async with executor(broker.bootstrap, prefix, url):
            async def settled() -> bool:
                got = await final_results(broker.bootstrap, prefix)
                return len(got) == 5 and all(r["status"] == "sent" for r in got.values())

            await wait_for(settled, 60, interval=0.2, what="all five sent")
    executed = [r for r in sb.requests if r["executed"]]
    slow_first = min(r["at"] for r in executed if r["account"] == slow)
    fast_last = max(r["at"] for r in executed if r["account"] == fast)
    # the fast line's three SMS (2.2 s of pacing) all left while the slow line's first was answered
    assert fast_last < slow_first + 3.0


async def test_a_zombie_executor_is_fenced_and_sends_nothing(broker: Broker, prefix: str) -> None:
    """An executor that lost its partition without knowing it (cut off from the group, not from
    Keyyo) sends nothing once the partition's next owner has started: the next owner's first step,
    starting the partition's transactional producer, is done here by hand while the first executor
    still believes it owns the partition. The action then goes to the next owner, sent once."""
    await create_topics(broker.bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=1)
    sb = Sandbox(passwords=PASSWORDS)
    first, late = sms(1, LINES[0]), sms(2, LINES[1])
    async with running(sb) as url:
        async with executor(broker.bootstrap, prefix, url) as zombie:
            await publish(broker.bootstrap, prefix, [first])

            async def first_sent() -> bool:
                got = await final_results(broker.bootstrap, prefix)
                return got.get(first.action_id, {}).get("status") == "sent"

            await wait_for(first_sent, 30, interval=0.2, what="the first SMS sent")
            group = zombie.settings.group
            next_owner = AIOKafkaProducer(bootstrap_servers=broker.bootstrap,
                                          transactional_id=f"{group}.{ACTIONS.full_name(prefix)}.0")
            await next_owner.start()  # fences every earlier producer of the partition's id
            try:
                await publish(broker.bootstrap, prefix, [late])

                def fenced_or_sent() -> bool:
                    fenced = zombie.metrics.registry.get_sample_value(
                        "keyyo_executor_fenced_total", {"group": group})
                    return bool(fenced) or any(r["params"].get("MSG") == late.message for r in sb.requests)

                # The fence is met on the write of `sending`, before any request: once it is counted,
                # the attempt is over, and a request it made would already be in the sandbox's list.
                await wait_for(fenced_or_sent, 30, interval=0.1, what="the zombie fenced (or sending)")
                assert not [r for r in sb.requests if r["params"].get("MSG") == late.message], \
                    "the zombie sent an action after the partition's next owner started"
                assert zombie.metrics.registry.get_sample_value(
                    "keyyo_executor_fenced_total", {"group": group}) == 1
                assert late.action_id not in await final_results(broker.bootstrap, prefix)
            finally:
                await next_owner.stop()
        # The partition's real next owner: reads the journal (no attempt of the late SMS), sends it.
        async with executor(broker.bootstrap, prefix, url):
            async def late_sent() -> bool:
                got = await final_results(broker.bootstrap, prefix)
                return got.get(late.action_id, {}).get("status") == "sent"

            await wait_for(late_sent, 30, interval=0.2, what="the late SMS sent by the next owner")
    assert [r["params"]["MSG"] for r in sb.requests if r["executed"]] == [first.message, late.message]


async def test_executors_joining_and_leaving_send_each_action_once_at_the_lines_pace(
    broker: Broker, prefix: str,
) -> None:
    """Two executors of one group over three partitions: the second joins while the first is
    sending, then the first leaves. Partitions change hands twice mid-flight; every SMS is sent
    exactly once, and each line keeps one request per second across owners."""
    await create_topics(broker.bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=3)
    sb = Sandbox(passwords=PASSWORDS)
    tenants = ["acme", "initech", "globex", "vandelay", "stark", "wonka"]  # two per partition
    actions = [sms(100 * t + i, LINES[t], tenant=tenant)  # a line of each tenant's own
               for t, tenant in enumerate(tenants) for i in range(6)]
    async with running(sb) as url:
        await publish(broker.bootstrap, prefix, actions)

        async def final_count() -> int:
            return sum(1 for r in (await final_results(broker.bootstrap, prefix)).values() if r["final"])

        async with executor(broker.bootstrap, prefix, url) as first:
            await wait_for(lambda: len([r for r in sb.requests if r["executed"]]) >= 4, 30, interval=0.1,
                           what="the first executor sending")
            async with executor(broker.bootstrap, prefix, url) as second:
                await wait_for(lambda: second.parts and len(first.parts) < 3, 60, interval=0.1,
                               what="the partitions shared")
                sent_before_leaving = len([r for r in sb.requests if r["executed"]])
                assert sent_before_leaving < len(actions), "everything was sent before the second joined"
                first.stop()  # leaves the group: the second takes every partition over
                await wait_for(lambda: len(second.parts) == 3, 60, interval=0.1,
                               what="the second owning every partition")

                async def all_final() -> bool:
                    return await final_count() == len(actions)

                await wait_for(all_final, 90, interval=0.3, what="every action final")
    got = await final_results(broker.bootstrap, prefix)
    assert {got[a.action_id]["status"] for a in actions} == {"sent"}
    executed = [r for r in sb.requests if r["executed"]]
    assert sorted(r["params"]["MSG"] for r in executed) == sorted(a.message for a in actions)  # once each
    assert not [r for r in sb.requests if r["status"] == 500], "a line got two requests within 1 s"
    for line in {a.account for a in actions}:
        times = [r["at"] for r in executed if r["account"] == line]
        assert all(b - a >= 1.0 for a, b in itertools.pairwise(times)), line
