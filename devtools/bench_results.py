"""Where benchmarks write their results: ``bench-results/<name>-<UTC time>.json``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson


def write_results(folder: str, name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` as indented JSON; return the file."""
    out = Path(folder)
    out.mkdir(exist_ok=True)
    path = out / f"{name}-{datetime.now(tz=UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"results: {path}")
    return path
