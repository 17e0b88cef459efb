"""Outbound actions benchmark: what one action-rules process decides per second, and what the
executor sends across many lines at Keyyo's one request per second per line.

1. Deciding: the simulator's call mix (missed, abandoned, answered, ACD...) for 200 tenants over
   four hours, as call records (32-hex ids, legs, revision 1) in the order their calls ended, with
   a missed-call SMS rule and an abandoned-call callback rule for every tenant. A raw consumer
   reads the records topic (baseline), then one action-rules process drains it exactly-once; the
   pure logic alone is timed too (µs per record).
2. Sending: ``--lines`` Keyyo lines with ``--per-line`` SMS each, all due now, written to the
   actions topic; the Keyyo sandbox runs in its own process (HTTP Digest, the 1 request/s rule).
   Baseline: a bare aiohttp client sending the same requests with the same per-line pacing (no
   Kafka, no journal). Then one executor process settles them all. Both against the ideal
   ``lines / min_interval`` requests/s.

    python -m devtools.bench_actions [--records 200000] [--lines 200] [--per-line 4]

Writes JSON to ``bench-results/actions-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import tomllib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp

from deploy.kafka_local import free_port
from deploy.topics import create_topics, provision_processor
from devtools.bench_acd_stats import simulated_records
from devtools.bench_call_records import fill, processor_throughput, raw_consume
from devtools.bench_results import bench_broker, keep_topics_option, logic_alone, write_results
from processors.action_rules import ActionRulesLogic
from processors.action_rules_config import parse_rules
from processors.executor import Executor, ExecutorMetrics, ExecutorSettings
from processors.keyyo_api import load_executor_config
from processors.registry import ACTION_RULES_SPEC as SPEC
from schemas.actions import Action, action_id
from schemas.notification import rfc3339_ms
from schemas.topics import ACTION_RESULTS, ACTIONS, CALL_RECORDS

TENANTS = 200


def rules_text(tenants: int) -> str:
    """A missed-call SMS and an abandoned-call callback for every tenant; no cap in the way."""
    return "".join(
        f"[tenants.tenant{i:03d}]\nmax_actions_per_hour = 100000\n"
        f'[[tenants.tenant{i:03d}.rules]]\nname = "missed-call-sms"\nwhen = ["missed", "abandoned"]\n'
        'action = "sms"\nmessage = "Bonjour, nous avons manqué votre appel de {time}."\n'
        f'[[tenants.tenant{i:03d}.rules]]\nname = "acd-callback"\nwhen = ["abandoned"]\n'
        f'action = "connect"\nagent = "33{100 + i:03d}000000"\n\n' for i in range(tenants))


def actions_for(lines: list[str], per_line: int, now_ms: int) -> list[Action]:
    return [Action(action_id=action_id("bench", line, str(n)), tenant=f"t{i % 50:02d}", kind="sms",
                   account=line, callee=f"336{i:04d}{n:04d}", caller=None, callee_name=None,
                   message="Bonjour, nous avons manqué votre appel.", profile=None,
                   not_before=rfc3339_ms(now_ms), expires_at=rfc3339_ms(now_ms + 3600_000),
                   origin={"bench": n}, created_at=rfc3339_ms(now_ms))
            for n in range(per_line) for i, line in enumerate(lines)]


async def bare_client(url: str, actions: list[Action], passwords: dict[str, str], interval: float) -> float:
    """The same SMS requests, paced per line, straight from aiohttp: requests/s."""
    by_line: dict[str, list[Action]] = {}
    for a in actions:
        by_line.setdefault(a.account, []).append(a)

    async def line_worker(session: aiohttp.ClientSession, line: str, queue: list[Action]) -> None:
        mw = aiohttp.DigestAuthMiddleware(line, passwords[line])
        last = 0.0
        for a in queue:
            await asyncio.sleep(max(0.0, last + interval - time.monotonic()))
            last = time.monotonic()
            async with session.get(f"{url}/sendsms.html", middlewares=(mw,), params={
                    "ACCOUNT": line, "CALLEE": a.callee or "", "MSG": a.message or ""}) as resp:
                await resp.read()

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(line_worker(session, line, q) for line, q in by_line.items()))
    return len(actions) / (time.perf_counter() - started)


async def executor_rate(bootstrap: str, prefix: str, config_path: Path, url: str,
                        actions: list[Action]) -> dict[str, Any]:
    await create_topics(bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS))
    await fill(bootstrap, ACTIONS.full_name(prefix), [(a.tenant.encode(), a.to_json()) for a in actions])
    settings = ExecutorSettings(bootstrap=bootstrap, group=f"{prefix}bench.executor",
                                actions_topic=ACTIONS.full_name(prefix),
                                results_topic=ACTION_RESULTS.full_name(prefix))
    config = load_executor_config(config_path)
    metrics = ExecutorMetrics(settings.group)
    ex = Executor(settings, dataclasses.replace(config, base_url=url), metrics)
    task = asyncio.create_task(ex.run())
    started = None
    while True:
        done = sum(s.value for m in metrics.registry.collect() for s in m.samples
                   if s.name == "keyyo_executor_actions_total")
        if started is None and done > 0:
            started = (time.perf_counter(), done)
        if done >= len(actions):
            break
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - started[0]  # type: ignore[index]
    statuses = {s.labels["status"]: s.value for m in metrics.registry.collect() for s in m.samples
                if s.name == "keyyo_executor_actions_total"}
    ex.stop()
    await task
    return {"actions_per_s": round((len(actions) - started[1]) / seconds, 1),  # type: ignore[index]
            "statuses": statuses}


def main() -> int:
    """Run the measurements, print them, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000, help="call records to decide on")
    parser.add_argument("--lines", type=int, default=200, help="Keyyo lines the executor sends for")
    parser.add_argument("--per-line", type=int, default=4, help="SMS per line")
    parser.add_argument("--out", default="bench-results")
    keep_topics_option(parser)
    args = parser.parse_args()
    results: dict[str, Any] = {"time": datetime.now(tz=UTC).isoformat(timespec="seconds")}
    start_ms = (time.time_ns() // 1_000_000) - 5 * 3600_000
    print(f"simulating {args.records} call records ({TENANTS} tenants, 4 h) ...", flush=True)
    items = simulated_records(args.records, TENANTS, 4.0, 11, start_ms)
    rules = rules_text(TENANTS)
    print("logic alone ...", flush=True)
    results["logic"] = logic_alone(items, ActionRulesLogic(parse_rules(tomllib.loads(rules))))
    lines = [f"33{200 + i // 1000:03d}{i % 1000:06d}" for i in range(args.lines)]
    with bench_broker(args.keep_topics) as bootstrap, TemporaryDirectory() as tmp:
        prefix = f"benchact{uuid.uuid4().hex[:6]}."
        config = Path(tmp) / "executor.toml"
        config.write_text("".join(f'[lines."{line}"]\npassword = "pw{line}"\n' for line in lines))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        sandbox = subprocess.Popen([sys.executable, "-m", "deploy.cli", "sandbox", "--port", str(port),
                                    "--config", str(config)], stdout=subprocess.DEVNULL,
                                   env={**os.environ, "KEYYO_LOG_LEVEL": "WARNING"})

        async def measure() -> None:
            rules_path = Path(tmp) / "rules.toml"
            rules_path.write_text(rules)
            topic = CALL_RECORDS.full_name(prefix)
            await provision_processor(bootstrap, SPEC, prefix, prefix, f"{prefix}bench.{SPEC.name}")
            print(f"filling {topic} with {len(items)} call records ...", flush=True)
            await fill(bootstrap, topic, items)
            print("raw consumer baseline ...", flush=True)
            raw = await raw_consume(bootstrap, topic, len(items))
            print("action-rules processor (exactly-once) ...", flush=True)
            proc = await processor_throughput(bootstrap, prefix, len(items), SPEC,
                                              logic=SPEC.logic(rules=str(rules_path)))
            decided = results["logic"]["outputs"]
            results["deciding"] = {
                "records": len(items), "raw_consumer_per_s": round(raw, 1), "processor": proc,
                "ratio": round(proc["records_per_s"] / raw, 3),
                "actions_per_s": round(proc["records_per_s"] * decided / len(items), 1)}
            await asyncio.sleep(1.0)  # the sandbox is up by now
            passwords = {line: f"pw{line}" for line in lines}
            interval = load_executor_config(config).min_interval_s
            print(f"bare client: {args.lines} lines x {args.per_line} SMS, paced {interval} s ...",
                  flush=True)
            now = time.time_ns() // 1_000_000
            bare = await bare_client(url, actions_for(lines, args.per_line, now), passwords, interval)
            async with aiohttp.ClientSession() as s:
                await (await s.delete(f"{url}/_sandbox/requests")).read()
            print("executor ...", flush=True)
            ex = await executor_rate(bootstrap, prefix + "send.", config, url,
                                     actions_for(lines, args.per_line, now + 1))
            async with aiohttp.ClientSession() as s, s.get(f"{url}/_sandbox/requests") as r:
                requests = await r.json()
            ideal = args.lines / interval
            results["sending"] = {
                "lines": args.lines, "per_line": args.per_line, "min_interval_s": interval,
                "ideal_per_s": round(ideal, 1), "bare_client_per_s": round(bare, 1), "executor": ex,
                "ratio_to_bare": round(ex["actions_per_s"] / bare, 3),
                "come_back_later": sum(1 for r in requests if r["status"] == 500)}

        try:
            asyncio.run(measure())
        finally:
            sandbox.terminate()
            sandbox.wait()
    d, lg, snd = results["deciding"], results["logic"], results["sending"]
    print(f"\ndeciding: action-rules {d['processor']['records_per_s']:.0f} call records/s exactly-once "
          f"vs raw consumer {d['raw_consumer_per_s']:.0f}/s: {d['ratio']:.3f}x; "
          f"{d['actions_per_s']:.0f} actions/s decided ({lg['outputs']} of {lg['records']} records)")
    print(f"logic alone: {lg['us_per_record']} µs per record ({lg['records_per_s']:.0f}/s)")
    print(f"sending: executor {snd['executor']['actions_per_s']:.0f} SMS/s over {snd['lines']} lines vs bare "
          f"paced client {snd['bare_client_per_s']:.0f}/s: {snd['ratio_to_bare']:.3f}x (ideal "
          f"{snd['ideal_per_s']:.0f}/s at {snd['min_interval_s']} s per line; Come Back Later: "
          f"{snd['come_back_later']})")
    write_results(args.out, "actions", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
