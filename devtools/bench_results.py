"""What the benchmarks share: the broker they run against (and the topics they leave on it),
where they write their results (``bench-results/<name>-<UTC time>.json``) and the timing of a
processor's logic alone."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from deploy.kafka_local import bootstrap_or_temporary_broker
from deploy.topics import delete_topics, topic_names
from processors.contract import Logic
from processors.output import Output, coalesce
from processors.state import Store

BENCH_TOPIC = re.compile(r"^(bench|benchacd|benchact|bare|big|lat|scale)[0-9a-f]{6}\.")
"""The names of the topics a benchmark makes: a prefix of its own, six random hex digits, a dot."""


def keep_topics_option(parser: argparse.ArgumentParser) -> None:
    """The ``--keep-topics`` option of every benchmark (see :func:`bench_broker`)."""
    parser.add_argument("--keep-topics", action="store_true",
                        help="on an existing broker (KAFKA_BOOTSTRAP_SERVERS), keep the topics this run "
                             "made (default: deleted at the end)")


@contextmanager
def bench_broker(keep_topics: bool = False) -> Iterator[str]:
    """The broker a benchmark runs against: ``KAFKA_BOOTSTRAP_SERVERS`` when set, else a
    temporary one (removed with everything on it at the end). On an existing broker the topics the
    run made (named by :data:`BENCH_TOPIC`, absent when it began) are deleted at the end, unless
    ``keep_topics``: a drain leaves ≈ 1 GB of topics, which a broker kept for days fills its disk
    with."""
    with bootstrap_or_temporary_broker() as bootstrap:
        existing = bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
        before = asyncio.run(topic_names(bootstrap)) if existing and not keep_topics else None
        try:
            yield bootstrap
        finally:
            if before is not None:
                made = sorted(t for t in asyncio.run(topic_names(bootstrap)) - before if BENCH_TOPIC.match(t))
                if made:
                    print(f"deleting the {len(made)} topics this run made on {bootstrap} "
                          "(--keep-topics keeps them) ...", flush=True)
                    asyncio.run(delete_topics(bootstrap, made))


def write_results(folder: str, name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` as indented JSON; return the file."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{datetime.now(tz=UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"results: {path}")
    return path


LOGIC_ROUNDS = 3
"""Rounds of :func:`logic_rounds`."""


def logic_rounds(items: list[tuple[bytes, bytes]], make: Callable[[], Logic[Any]],
                 rounds: int = LOGIC_ROUNDS) -> dict[str, Any]:
    """:func:`logic_alone` ``rounds`` times, each with a new logic from ``make`` and a new store:
    the round of median time, with every round's µs per record (``rounds_us``). On this machine
    one round of the same code took 9 to 17 µs per notification within minutes, while the
    process had its core (its CPU time equal to the wall time, no steal time): the median of
    three is less at the mercy of one slow stretch of the host."""
    runs = [logic_alone(items, make()) for _ in range(rounds)]
    median = sorted(runs, key=lambda run: run["us_per_record"])[len(runs) // 2]
    return {**median, "rounds_us": [run["us_per_record"] for run in runs]}


def logic_alone(items: list[tuple[bytes, bytes]], logic: Logic[Any]) -> dict[str, Any]:
    """A processor's logic over its input records: decode, fold, encode
    what a transaction writes, one transaction per 500 records; also counts the outputs written,
    and times decoding alone (``decode_us``)."""
    store = Store()
    outputs: list[Output] = []
    written = 0
    started = time.perf_counter()
    for i, (key, value) in enumerate(items):
        event = logic.decode(key, value)
        domain = logic.time_domain(event)
        store.advance(domain, logic.event_time_ms(event))
        store.domain = domain
        outputs.extend(logic.on_event(store, event, store.time(domain)))
        if i % 500 == 499:
            written += len(coalesce(outputs))
            outputs = []
            store.commit()
    written += len(coalesce(outputs))
    store.commit()
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    for key, value in items:
        logic.decode(key, value)
    decoding = time.perf_counter() - started
    return {"records": len(items), "outputs": written,
            "us_per_record": round(seconds / len(items) * 1e6, 2),
            "decode_us": round(decoding / len(items) * 1e6, 2),
            "records_per_s": round(len(items) / seconds, 1)}
