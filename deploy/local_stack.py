"""``keyyo-stream run``: the whole pipeline on local defaults, with demo traffic."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from deploy.kafka_local import LocalKafka
from deploy.topics import create_topics
from devtools.traffic import demo_calls
from ingest.app import build_app
from ingest.config import hash_secret, load_settings

log = logging.getLogger("keyyo.run")

DEMO_TENANT = "demo"
DEMO_LINES = ["33123456789", "33123456790", "33123456791"]


def _ensure_config(state_dir: Path) -> tuple[Path, str]:
    """Write ``ingest.toml`` with a demo tenant on first run; return it and the demo secret."""
    state_dir.mkdir(parents=True, exist_ok=True)
    secret_file = state_dir / "demo.secret"
    config = state_dir / "ingest.toml"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(24))
    secret = secret_file.read_text().strip()
    if not config.exists():
        config.write_text(
            "# Written by `keyyo-stream run`. The demo tenant's secret is in demo.secret.\n"
            f"[tenants.{DEMO_TENANT}]\n"
            f'token_sha256 = "{hash_secret(secret)}"\n\n'
            "[ingest]\n"
            "produce_budget_seconds = 2.0\n"
            'spool_dir = "spool"\n'
        )
    return config, secret


async def _demo_traffic(base: str, secret: str, rate: float, stats: dict[str, int]) -> None:
    """Send the guide's example calls to the edge over HTTP, ``rate`` calls per second."""
    url = f"{base}/v1/keyyo/{DEMO_TENANT}/notifications"
    calls = demo_calls(DEMO_LINES, lambda: time.time_ns() // 1_000_000)
    async with aiohttp.ClientSession() as session:
        while True:
            for params in next(calls):
                async with session.get(url, params={"key": secret, **params}) as resp:
                    stats[str(resp.status)] = stats.get(str(resp.status), 0) + 1
            stats["calls"] = stats.get("calls", 0) + 1
            await asyncio.sleep(1.0 / rate)


async def _serve(args: argparse.Namespace, bootstrap: str, config: Path, secret: str) -> None:
    settings = load_settings(config, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap})
    runner = web.AppRunner(build_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    base = f"http://127.0.0.1:{args.port}"
    print(f"ingest listening on {base} (tenant {DEMO_TENANT!r}, key in {config.parent}/demo.secret)",
          flush=True)
    print(f"try: curl '{base}/v1/keyyo/{DEMO_TENANT}/notifications?key={secret}&account=33123456789"
          "&caller=33612345678&callee=33123456789&callref=1&type=SETUP&dref=abc123'", flush=True)
    print("follow: keyyo-stream tail notifications", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stats: dict[str, int] = {}
    tasks = []
    if args.demo_rate > 0:
        tasks.append(asyncio.create_task(_demo_traffic(base, secret, args.demo_rate, stats)))
    started = time.monotonic()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10.0)
            if tasks and tasks[0].done() and tasks[0].exception():
                log.error("demo traffic stopped: %r", tasks[0].exception())
                tasks.clear()
            elapsed = time.monotonic() - started
            print(f"[{elapsed:6.0f}s] demo calls={stats.get('calls', 0)} "
                  f"notifications 200={stats.get('200', 0)} other="
                  f"{sum(v for k, v in stats.items() if k not in ('calls', '200'))}", flush=True)
            if args.duration is not None and elapsed >= args.duration:
                break
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()


def run_local(args: argparse.Namespace) -> int:
    """Start what is missing, run until interrupted, then stop what this command started."""
    state_dir = Path(args.state_dir).resolve()
    config, secret = _ensure_config(state_dir)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker: LocalKafka | None = None
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
