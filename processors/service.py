"""Running a processor as a process: signals, the health side port, then the runtime loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from processors.contract import Logic
from processors.executor import Executor, ExecutorMetrics, ExecutorSettings
from processors.keyyo_api import ExecutorConfig
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


async def serve_executor(settings: ExecutorSettings, config: ExecutorConfig, health_host: str,
                         health_port: int, next_free: int = 100) -> None:
    """Run the action executor until SIGTERM/SIGINT (finish the requests in flight, write their
    results, commit, leave the group)."""
    metrics = ExecutorMetrics(settings.group)
    executor = Executor(settings, config, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, executor.stop)
    async with health_server(health_host, health_port, metrics, executor.readiness,
                             executor.detail, next_free=next_free) as port:
        log.info("executor running", extra={
            "group": settings.group, "input": settings.actions_topic, "results": settings.results_topic,
            "keyyo": config.base_url, "auth": config.auth, "lines": len(config.passwords),
            "health": f"http://{health_host}:{port}/readyz"})
        await executor.run()
    log.info("executor stopped", extra={"group": settings.group})
