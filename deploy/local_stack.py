"""``keyyo-stream run``: the whole pipeline on local defaults, with simulated traffic.

Broker (unless ``KAFKA_BOOTSTRAP_SERVERS``), topics, the ingest edge on :8080, every declared
processor (call-records with health on :9101, acd-stats on :9111, action-rules on :9121), the
action executor (:9131) against the Keyyo sandbox (:8090), and the simulator sending a gentle mix
of Keyyo call flows. The demo tenant's missed callers get an SMS, sent to the sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import signal
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from deploy.kafka_local import LocalKafka, broker_answers, port_open
from deploy.topics import create_topics, provision_processor
from devtools.sandbox import Sandbox, lines_from_config, running
from devtools.simulate import HttpSender
from devtools.simulator import Chaos, Planner, plan_traffic, play, schedule
from ingest.app import EdgeRunner, build_app
from ingest.config import hash_secret, load_settings
from processors.executor import Executor, ExecutorMetrics, ExecutorSettings
from processors.keyyo_api import load_executor_config
from processors.observability import ProcessorMetrics, health_server
from processors.registry import ACD_STATS_SPEC, ACTION_RULES_SPEC, CALL_RECORDS_SPEC, PROCESSORS
from processors.runtime import Runtime
from schemas.topics import ACTION_RESULTS, ACTIONS

log = logging.getLogger("keyyo.run")

DEMO_TENANT = "demo"
DEMO_LINES = [f"33100{j:06d}" for j in range(6)]
"""The simulator's lines of the demo tenant (its first tenant, six lines)."""
SMS_TEXT = "Bonjour, nous avons manqué votre appel. Nous vous rappelons vite."


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _ensure_config(state_dir: Path) -> tuple[Path, str]:
    """Write ``ingest.toml`` with a demo tenant on first run; return it and the demo secret."""
    state_dir.mkdir(parents=True, exist_ok=True)
    secret_file = state_dir / "demo.secret"
    config = state_dir / "ingest.toml"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(24))
    secret = secret_file.read_text().strip()
    api_file = state_dir / "demo.api-token"
    if not api_file.exists():
        api_file.write_text(secrets.token_urlsafe(24))
    api_token = api_file.read_text().strip()
    # Rewritten when an older run wrote it without the actions API token (it is ours to rewrite).
    if not config.exists() or "api_token_sha256" not in config.read_text():
        config.write_text(
            "# Written by `keyyo-stream run`. The demo tenant's secret is in demo.secret, its\n"
            "# actions API token in demo.api-token.\n"
            f"[tenants.{DEMO_TENANT}]\n"
            f'token_sha256 = "{hash_secret(secret)}"\n'
            f'api_token_sha256 = "{hash_secret(api_token)}"\n\n'
            "[ingest]\n"
            "produce_budget_seconds = 2.0\n"
            'spool_dir = "spool"\n'
        )
    rules = state_dir / "rules.toml"
    if not rules.exists():
        rules.write_text(
            "# Written by `keyyo-stream run`: the action-rules processor's rules\n"
            "# (README, Outbound actions).\n"
            f"[[tenants.{DEMO_TENANT}.rules]]\n"
            'name = "missed-call-sms"\n'
            'when = ["missed", "abandoned"]\n'
            'action = "sms"                     # to the caller, from the line that was called\n'
            f'message = "{SMS_TEXT}"\n'
        )
    executor = state_dir / "executor.toml"
    if not executor.exists():
        executor.write_text(
            "# Written by `keyyo-stream run`: the executor's settings. Keyyo is the local sandbox,\n"
            "# which knows the same SIP passwords (HTTP Digest).\n"
            "[keyyo]\n"
            'base_url = "http://127.0.0.1:8090"\n\n'
            + "".join(f'[lines."{line}"]\npassword = "{secrets.token_urlsafe(12)}"\n' for line in DEMO_LINES))
    acd = state_dir / "acd.toml"
    if not acd.exists():
        acd.write_text(
            "# Written by `keyyo-stream run`: the acd-stats processor's settings (README, ACD statistics).\n"
            "[acd]\n"
            "interval_minutes = 15\n"
            'timezone = "Europe/Paris"\n'
            "service_level_seconds = 20\n\n"
            f"[[acd.tenants.{DEMO_TENANT}.queues]]\n"
            'name = "sales"\n'
            'agents = ["33100000000", "33100000001"]   # calls that ring these lines first\n'
        )
    return config, secret


async def _simulate(base: str, secret: str, rate: float, time_scale: float, stats: dict[str, int]) -> None:
    """The simulator's mix of call flows, ``rate`` calls per second, minute after minute."""
    rng = random.Random()  # noqa: S311 - simulated traffic, not security
    planner = Planner([DEMO_TENANT], 6, rng, time_scale=time_scale)
    sender = HttpSender(base, {DEMO_TENANT: secret})

    async def counted(tenant: str, params: dict[str, str]) -> int:
        status = await sender(tenant, params)
        stats[str(status)] = stats.get(str(status), 0) + 1
        return status

    async with aiohttp.ClientSession() as session:
        sender.session = session
        while True:
            calls = plan_traffic(planner, rate, 60, _ms() + 100, Chaos())
            stats["calls"] = stats.get("calls", 0) + len(calls)
            await play(schedule(calls, Chaos(), rng), counted, _ms)


async def _serve(args: argparse.Namespace, bootstrap: str, config: Path, secret: str) -> None:
    state = config.parent
    acd_config = state / "acd.toml"
    settings = load_settings(config, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap})
    runner = EdgeRunner(build_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    base = f"http://127.0.0.1:{args.port}"
    processors: list[tuple[str, int, ProcessorMetrics, Runtime]] = []
    for spec in PROCESSORS.values():
        await provision_processor(bootstrap, spec, "", "", spec.group())
        metrics = ProcessorMetrics(spec.group())
        port = args.processor_port if spec is CALL_RECORDS_SPEC else spec.health_port
        options = {ACD_STATS_SPEC.name: {"config": str(acd_config)},
                   ACTION_RULES_SPEC.name: {"rules": str(state / "rules.toml")}}.get(spec.name, {})
        logic = spec.logic(**options)
        runtime_settings = spec.settings(bootstrap, state_dir=config.parent / "checkpoints")
        processors.append((spec.name, port, metrics, Runtime(runtime_settings, logic, metrics)))
    print(f"ingest listening on {base} (tenant {DEMO_TENANT!r}, key in {config.parent}/demo.secret)",
          flush=True)
    print(f"try: curl '{base}/v1/keyyo/{DEMO_TENANT}/notifications?key={secret}&account=33123456789"
          "&caller=33612345678&callee=33123456789&callref=1&type=SETUP&dref=abc123'", flush=True)
    print("follow: keyyo-stream tail notifications | tail call-updates | tail call-records | "
          "tail acd-stats | tail actions | tail action-results", flush=True)
    print(f"report: keyyo-stream report acd --tenant {DEMO_TENANT}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stats: dict[str, int] = {}
    executor_config = load_executor_config(state / "executor.toml")
    sandbox = Sandbox(passwords=lines_from_config(state / "executor.toml"),
                      notify_url=f"{base}/v1/keyyo/{DEMO_TENANT}/notifications?key={secret}")
    executor_settings = ExecutorSettings(bootstrap=bootstrap, group="keyyo.execute-actions",
                                         actions_topic=ACTIONS.name, results_topic=ACTION_RESULTS.name)
    executor_metrics = ExecutorMetrics(executor_settings.group)
    async with contextlib.AsyncExitStack() as stack:
        keyyo = await stack.enter_async_context(running(sandbox, "127.0.0.1", args.sandbox_port))
        executor = Executor(executor_settings, dataclasses.replace(executor_config, base_url=keyyo),
                            executor_metrics)
        print(f"keyyo sandbox on {keyyo} (its requests: {keyyo}/_sandbox/requests)", flush=True)
        print(f"ask: curl -X POST {base}/v1/keyyo/{DEMO_TENANT}/actions -H \"Authorization: Bearer "
              f"$(cat {state}/demo.api-token)\" -H 'Content-Type: application/json' -d "
              f"'{{\"kind\": \"call\", \"account\": \"{DEMO_LINES[0]}\", \"callee\": \"33612345678\"}}'",
              flush=True)
        tasks = []
        port = await stack.enter_async_context(health_server(
            "127.0.0.1", 9131, executor_metrics, executor.readiness, executor.detail, next_free=100))
        print(f"executor health on http://127.0.0.1:{port}/readyz", flush=True)
        tasks.append(asyncio.create_task(executor.run(), name="executor"))
        for name, port, metrics, runtime in processors:
            health_port = await stack.enter_async_context(health_server(
                "127.0.0.1", port, metrics, runtime.readiness, runtime.detail, next_free=100))
            print(f"{name} processor health on http://127.0.0.1:{health_port}/readyz", flush=True)
            tasks.append(asyncio.create_task(runtime.run(), name=name))
        if args.demo_rate > 0:
            tasks.append(asyncio.create_task(
                _simulate(base, secret, args.demo_rate, args.time_scale, stats), name="simulator"))
        started = time.monotonic()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 10.0)
                for task in [t for t in tasks if t.done()]:
                    tasks.remove(task)
                    if not task.cancelled() and task.exception() is not None:
                        log.error("%s stopped: %r", task.get_name(), task.exception())
                        stop.set()
                elapsed = time.monotonic() - started
                written = {s.labels["topic"]: s.value for _, _, metrics, _ in processors
                           for m in metrics.registry.collect()
                           if m.name == "keyyo_processor_records_out" for s in m.samples
                           if s.name.endswith("_total")}
                print(f"[{elapsed:6.0f}s] simulated calls={stats.get('calls', 0)} "
                      f"notifications 200={stats.get('200', 0)} "
                      f"other={sum(v for k, v in stats.items() if k not in ('calls', '200'))} "
                      f"call-updates={written.get('keyyo.call-updates.v1', 0):.0f} "
                      f"call-records={written.get('keyyo.call-records.v1', 0):.0f} "
                      f"acd-stats={written.get('keyyo.acd-stats.v1', 0):.0f} "
                      f"actions={written.get('keyyo.actions.v1', 0):.0f} "
                      f"sms-sent={sum(r['executed'] and r['kind'] == 'sms' for r in sandbox.requests)}",
                      flush=True)
                if args.duration is not None and elapsed >= args.duration:
                    break
        finally:
            for _, _, _, runtime in processors:
                runtime.stop()
            executor.stop()
            for task in tasks:
                if task.get_name() == "simulator":
                    task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            await runner.cleanup()


def run_local(args: argparse.Namespace) -> int:
    """Start what is missing, run until interrupted, then stop what this command started."""
    state_dir = Path(args.state_dir).resolve()
    config, secret = _ensure_config(state_dir)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker: LocalKafka | None = None
    if not bootstrap and port_open("127.0.0.1", args.kafka_port):
        bootstrap = f"127.0.0.1:{args.kafka_port}"
        if not asyncio.run(broker_answers(bootstrap)):
            print(f"error: port {args.kafka_port} is taken by a program that does not answer as a "
                  "Kafka broker; free it or choose --kafka-port", file=sys.stderr, flush=True)
            return 1
        print(f"kafka already listening on {bootstrap} (another checkout, or `keyyo-stream kafka "
              "start`): using it, and leaving it running", flush=True)
    if not bootstrap:
        broker = LocalKafka(home=state_dir / f"kafka-{args.kafka_port}", port=args.kafka_port)
        started = broker.start()
        print(f"kafka {'started' if started else 'already running'}: bootstrap={broker.bootstrap} "
              f"(logs: {broker.log_file})", flush=True)
        if not started:
            broker = None  # not ours to stop
        bootstrap = f"127.0.0.1:{args.kafka_port}"
    try:
        for name, state in asyncio.run(create_topics(bootstrap)).items():
            print(f"topic {name}: {state}", flush=True)
        asyncio.run(_serve(args, bootstrap, config, secret))
    finally:
        if broker is not None:
            print("stopping kafka", flush=True)
            broker.stop()
    return 0
