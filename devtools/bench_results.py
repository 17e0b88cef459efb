"""What the benchmarks share: where they write their results (``bench-results/<name>-<UTC
time>.json``) and the timing of a processor's logic alone."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from processors.contract import Logic
from processors.output import Output, coalesce
from processors.state import Store


def write_results(folder: str, name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` as indented JSON; return the file."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{datetime.now(tz=UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"results: {path}")
    return path


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
