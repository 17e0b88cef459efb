"""Running a processor as a process: signals, the health side port, then the runtime loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from processors.contract import Logic
from processors.observability import ProcessorMetrics, health_server
from processors.runtime import Runtime, RuntimeSettings

log = logging.getLogger("keyyo.processor")


async def serve(settings: RuntimeSettings, logic: Logic[Any], health_host: str, health_port: int,
                next_free: int = 100) -> bool:
    """Run until SIGTERM/SIGINT (finish the batch, commit, leave the group) or the input drains.

    Returns False when a partition worker failed (the caller exits non-zero).
    """
    metrics = ProcessorMetrics(settings.group)
    runtime = Runtime(settings, logic, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.stop)
    async with health_server(health_host, health_port, metrics, runtime.readiness,
                             runtime.detail, next_free=next_free) as port:
        log.info("processor running", extra={
            "group": settings.group, "input": settings.input_topic, "mode": settings.mode,
            "health": f"http://{health_host}:{port}/readyz"})
        await runtime.run()
    log.info("processor stopped", extra={"group": settings.group, "failed": runtime.failed})
    return not runtime.failed
