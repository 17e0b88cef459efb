"""Outbound actions end to end on a real broker: simulator -> ingest (HTTP) -> call-records ->
action-rules -> executor -> Keyyo sandbox (each its own process but the edge and call-records).

With duplicated and reordered notifications, the rules processor and then the executor killed
with SIGKILL mid-run and restarted: every missed caller gets one SMS decided, no SMS is ever sent
twice, every action ends with a result, and no line is sent more than one request per second.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.kafka_local import free_port, port_open
from devtools.simulate import HttpSender, wall_ms
from devtools.simulator import Chaos, play
from processors.registry import ACTION_RULES_SPEC
from schemas.topics import ACTIONS
from tests.integration.edge import SECRET, TENANTS, running_edge
from tests.integration.pipeline import (
    cli_process,
    processor_process,
    provision,
    running_processor,
    stop_process,
    traffic,
)
from tests.integration.test_executor import final_results
from tests.kafka import Broker, read_values, settled, wait_for
from tests.truth import expected_records

pytestmark = pytest.mark.asyncio(loop_scope="session")
MESSAGE = "Bonjour, nous avons manqué votre appel. Nous vous rappelons vite."


async def sandbox_requests(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/_sandbox/requests") as r:
        return list(await r.json())


async def test_every_missed_caller_gets_one_sms_through_kills(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    await provision(broker.bootstrap, prefix)
    await provision(broker.bootstrap, prefix, spec=ACTION_RULES_SPEC)
    chaos = Chaos(duplicate=0.1, reorder=0.1)
    calls, sends = traffic(seed=47, rate=14, duration=10, start_ms=wall_ms() + 1000, chaos=chaos)
    truth = expected_records(calls).values()
    expected = Counter((r["tenant"], r["caller"]) for r in truth
                       if r["outcome"] in ("missed", "abandoned") and r["direction"] == "inbound")
    assert sum(expected.values()) >= 15 and max(expected.values()) == 1
    lines = {leg["account"] for r in truth for leg in r["legs"]}
    rules = tmp_path / "rules.toml"
    rules.write_text("".join(
        f'[[tenants.{t}.rules]]\nname = "missed-call-sms"\nwhen = ["missed", "abandoned"]\n'
        f'action = "sms"\nmessage = "{MESSAGE}"\n\n' for t in TENANTS))
    config = tmp_path / "executor.toml"
    config.write_text("".join(f'[lines."{line}"]\npassword = "pw-{line}"\n' for line in sorted(lines)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sandbox = cli_process(tmp_path / "sandbox.log", "sandbox", "--port", str(port), "--config", str(config),
                    "--closed")
    executor_args = ["execute", "actions", "--config", str(config), "--base-url", url, "--bootstrap",
                     broker.bootstrap, "--prefix", prefix, "--health-port", "0"]
    rules_args = ("--rules", str(rules), "--lateness-ms", "300")
    procs: list[subprocess.Popen[bytes]] = [sandbox]
    try:
        rules_proc = processor_process(broker.bootstrap, prefix, tmp_path / "rules-1.log", *rules_args,
                                       name="action-rules")
        executor = cli_process(tmp_path / "executor-1.log", *executor_args)
        procs += [rules_proc, executor]
        await wait_for(lambda: sandbox.poll() is None and port_open("127.0.0.1", port), 30, interval=0.2,
                       what="the sandbox")
        async with running_edge(broker.bootstrap, prefix, create=False) as edge, \
                running_processor(broker.bootstrap, prefix):
            sender = HttpSender(str(edge.client.make_url("")), dict.fromkeys(TENANTS, SECRET))
            async with aiohttp.ClientSession() as session:
                sender.session = session
                player = asyncio.create_task(play(sends, sender, wall_ms))

                async def decided(share: float) -> bool:
                    got = await read_values(broker.bootstrap, ACTIONS.full_name(prefix))
                    return len(got) >= sum(expected.values()) * share

                await wait_for(lambda: decided(0.25), 60, interval=0.3, what="a quarter decided")
                assert not player.done(), "the traffic ended before the first kill"
                rules_proc.send_signal(signal.SIGKILL)
                rules_proc.wait()
                rules_proc = processor_process(broker.bootstrap, prefix, tmp_path / "rules-2.log",
                                               *rules_args, name="action-rules")
                procs.append(rules_proc)

                async def half_sent() -> bool:
                    sent = [r for r in await sandbox_requests(url) if r["executed"]]
                    return len(sent) >= sum(expected.values()) // 2

                await wait_for(half_sent, 60, interval=0.2, what="half the SMS sent")
                executor.send_signal(signal.SIGKILL)
                executor.wait()
                executor = cli_process(tmp_path / "executor-2.log", *executor_args)
                procs.append(executor)
                assert await player == {"200": len(sends)}

            async def all_final() -> bool:
                results = await final_results(broker.bootstrap, prefix)
                return len(results) == sum(expected.values()) and all(r["final"] for r in results.values())

            await wait_for(all_final, 120, interval=0.5, what="a final result for every missed caller")
        assert stop_process(rules_proc) == 0
        assert stop_process(executor) == 0
        requests = await sandbox_requests(url)
    finally:
        for proc in procs:
            stop_process(proc)

    await settled(broker.bootstrap, ACTIONS.full_name(prefix))  # the stopped processor's last transaction too
    actions = await read_values(broker.bootstrap, ACTIONS.full_name(prefix))
    # Decided exactly once per missed caller, through the rules processor's kill.
    assert len({a["action_id"] for a in actions}) == len(actions), "an action decided twice"
    assert Counter((a["tenant"], a["callee"]) for a in actions) == expected
    assert all(a["message"] == MESSAGE and a["account"] in lines for a in actions)
    results = await final_results(broker.bootstrap, prefix)
    statuses = Counter(r["status"] for r in results.values())
    assert set(statuses) <= {"sent", "unknown"}, statuses
    executed = Counter((r["account"], r["params"]["CALLEE"]) for r in requests if r["executed"])
    # Never twice; exactly once when the result says sent (unknown: the kill came mid-request).
    assert max(executed.values()) == 1
    for a in actions:
        sent_here = executed[(a["account"], a["callee"])]
        assert sent_here == 1 if results[a["action_id"]]["status"] == "sent" else sent_here <= 1
    assert statuses["unknown"] <= len(lines)
    assert not [r for r in requests if r["status"] == 500], "a line got more than one request per second"


async def test_the_rules_processor_arms_schedules_before_any_call(broker: Broker, prefix: str,
                                                                   tmp_path: Path) -> None:
    """Not one call record: each partition's start arms the schedules of the tenants it holds, in
    its state's changelog, so a tenant without calls still gets its profile switches; a restart
    arms nothing twice."""
    from processors.observability import ProcessorMetrics
    from processors.runtime import Runtime
    from tests.integration.pipeline import provision
    from tests.kafka import read_topic

    tenants = [f"quiet{i}" for i in range(6)]  # spread over the three partitions
    rules = tmp_path / "rules.toml"
    rules.write_text("".join(
        f'[[tenants.{t}.schedules]]\nname = "closed"\nline = "33123456789"\nprofile = "Fermé"\n'
        f'at = "18:00"\ndays = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]\n' for t in tenants))
    await provision(broker.bootstrap, prefix, spec=ACTION_RULES_SPEC)
    settings = ACTION_RULES_SPEC.settings(broker.bootstrap, prefix)

    async def start_and_stop() -> None:
        runtime = Runtime(settings, ACTION_RULES_SPEC.logic(rules=str(rules)),
                          ProcessorMetrics(settings.group))
        task = asyncio.create_task(runtime.run())
        try:
            await wait_for(lambda: len(runtime.parts) == 3 and not runtime.restoring
                           and not any(p.starting for p in runtime.parts.values()), 60,
                           interval=0.1, what="three partitions started")
        finally:
            runtime.stop()
            await asyncio.wait_for(task, 60)

    async def armed() -> list[str]:
        await settled(broker.bootstrap, settings.changelog_topic)
        return [r.key.decode() for r in await read_topic(broker.bootstrap, settings.changelog_topic)
                if r.key is not None and r.key.decode().startswith("s/")]

    await start_and_stop()
    first = await armed()
    assert sorted(key.split("/")[1] for key in first) == tenants  # each tenant's schedule, once
    await start_and_stop()
    assert await armed() == first  # nothing written again
