"""``keyyo-stream simulate``: plan traffic, send it over HTTP (or to the topic), write ground truth."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from devtools.simulator import SCENARIOS, Chaos, Planner, plan_traffic, play, schedule


def wall_ms() -> int:
    """Wall clock, ms."""
    return time.time_ns() // 1_000_000


class HttpSender:
    """GETs to the ingest edge, retrying 503s as a careful sender would."""

    def __init__(self, base: str, secrets: dict[str, str], retries: int = 5) -> None:
        self.base = base.rstrip("/")
        self.secrets = secrets
        self.retries = retries
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, tenant: str, params: dict[str, str]) -> int:
        assert self.session is not None
        url = f"{self.base}/v1/keyyo/{tenant}/notifications"
        query = {"key": self.secrets[tenant], **params}
        status = 0
        for attempt in range(self.retries + 1):
            try:
                async with self.session.get(url, params=query) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ClientError:
                status = 599
            if status not in (503, 599) or attempt == self.retries:
                return status
            await asyncio.sleep(0.5 * (attempt + 1))
        return status


class KafkaSender:
    """Straight to the notification topic, normalised exactly as the edge does."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from aiokafka import AIOKafkaProducer

        self.topic = topic
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                         enable_idempotence=True, linger_ms=2)

    async def __call__(self, tenant: str, params: dict[str, str]) -> int:
        from ingest.parsing import Refusal, parse_notification

        result = parse_notification(tenant, list(params.items()), "127.0.0.1", wall_ms())
        if isinstance(result, Refusal):
            return 400
        await self.producer.send_and_wait(self.topic, result.to_json(), key=tenant.encode())
        return 200


async def simulate(args: argparse.Namespace) -> int:
    """Run one simulation; print progress; return non-zero if a notification was not accepted."""
    rng = random.Random(args.seed)
    secrets = dict(t.split("=", 1) for t in args.tenant)
    planner = Planner(sorted(secrets), args.lines, rng, time_scale=args.time_scale)
    chaos = Chaos(duplicate=args.duplicate, reorder=args.reorder, delay=args.delay,
                  delay_ms=int(args.delay_ms), drop_release=args.drop_release)
    start = wall_ms() + 200
    scenarios = args.scenario or None
    calls = plan_traffic(planner, args.rate, args.duration, start, chaos, scenarios)
    sends = schedule(calls, chaos, rng)
    if args.truth:
        lines = [orjson.dumps({"match": sorted(leg.dref for leg in c.legs), "scenario": c.scenario,
                               "expected": c.expected()}) for c in calls]
        await asyncio.to_thread(Path(args.truth).write_bytes, b"".join(line + b"\n" for line in lines))
    print(f"simulating {len(calls)} calls ({len(sends)} notifications) over {args.duration:.0f}s "
          f"for {len(secrets)} tenant(s)", file=sys.stderr, flush=True)
    sender: Any
    if args.to_kafka:
        from schemas.topics import NOTIFICATIONS

        sender = KafkaSender(args.bootstrap, NOTIFICATIONS.full_name(args.prefix or ""))
        await sender.producer.start()
        try:
            statuses = await play(sends, sender, wall_ms, _progress)
        finally:
            await sender.producer.stop()
    else:
        sender = HttpSender(args.url, secrets)
        async with aiohttp.ClientSession() as session:
            sender.session = session
            statuses = await play(sends, sender, wall_ms, _progress)
    print(f"done: {len(calls)} calls, answers {dict(sorted(statuses.items()))}",
          file=sys.stderr, flush=True)
    return 0 if set(statuses) <= {"200"} else 1


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``simulate`` options."""
    p.add_argument("--url", default="http://127.0.0.1:8080", help="ingest base URL")
    p.add_argument("--tenant", action="append", required=True, metavar="NAME=SECRET",
                   help="a tenant and its secret (repeatable)")
    p.add_argument("--lines", type=int, default=5, help="lines per tenant (at least 3)")
    p.add_argument("--rate", type=float, default=1.0, help="new calls per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of call arrivals")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiplies ring and talk durations (0.05: twenty times faster)")
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help="only these flows, in turn (repeatable; default: a random mix)")
    p.add_argument("--duplicate", type=float, default=0.0, help="probability of sending twice")
    p.add_argument("--reorder", type=float, default=0.0, help="probability of swapping with the next")
    p.add_argument("--delay", type=float, default=0.0, help="probability of sending late")
    p.add_argument("--delay-ms", type=float, default=1500, help="how late")
    p.add_argument("--drop-release", type=float, default=0.0,
                   help="probability, per call, that one leg's RELEASE is never sent")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--truth", help="write the expected records (JSON lines) here")
    p.add_argument("--to-kafka", action="store_true", help="produce to the topic, not over HTTP")
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--prefix", default=None)
