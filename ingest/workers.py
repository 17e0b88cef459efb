"""``keyyo-stream ingest --workers N``: N edge processes sharing one port (``SO_REUSEPORT``).

The kernel spreads new connections over the workers. Each worker is a whole edge: its own Kafka
producer, its own spool (``<spool_dir>/worker-<i>``, replayed by the worker of that index), and
its own port for ``/metrics``, ``/healthz`` and ``/readyz`` (``--metrics-port`` + i, on
``--metrics-host``): counters are per worker, a scraper sums them. This supervisor forwards
SIGTERM/SIGINT to every worker and waits for them (each finishes its requests and flushes), and
SIGHUP (each reads its tenants again); a worker that dies is started again, unless they keep dying.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import FrameType

log = logging.getLogger("keyyo.ingest")

MAX_RESTARTS_PER_MINUTE = 5


def worker_command(config: Path, host: str, port: int, index: int, metrics_host: str,
                   metrics_port: int, log_level: str, log_format: str, uvloop: bool) -> list[str]:
    """The command line of worker ``index``."""
    return [sys.executable, "-m", "deploy.cli", "--log-level", log_level, "--log-format", log_format,
            "ingest", "--config", str(config), "--host", host, "--port", str(port),
            "--worker", str(index), "--metrics-host", metrics_host,
            "--metrics-port", str(metrics_port + index), *([] if uvloop else ["--no-uvloop"])]


def run_workers(config: Path, host: str, port: int, workers: int, metrics_host: str,
                metrics_port: int, log_level: str, log_format: str, uvloop: bool) -> int:
    """Start the workers and supervise them until a signal; the exit code of the whole."""
    commands = [worker_command(config, host, port, i, metrics_host, metrics_port, log_level,
                               log_format, uvloop) for i in range(workers)]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def start(index: int) -> None:
        procs[index] = subprocess.Popen(commands[index])
        print(f"ingest worker {index}: pid {procs[index].pid}, http://{host}:{port}, own port "
              f"http://{metrics_host}:{metrics_port + index}/metrics", flush=True)

    def reload(signum: int, _frame: FrameType | None) -> None:
        for proc in procs.values():  # each worker reads the configuration again
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for index in range(workers):
        start(index)
    restarts: deque[float] = deque()
    failed = False
    while procs:
        time.sleep(0.2)
        for index, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if stopping:
                del procs[index]
                if code != 0:
                    failed = True
                continue
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > 60:
                restarts.popleft()
            if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                print(f"error: ingest workers keep exiting (worker {index}: exit {code}); stopping",
                      file=sys.stderr, flush=True)
                failed = True
                stop(signal.SIGTERM, None)
                del procs[index]
                continue
            log.error("ingest worker exited; starting it again", extra={"worker": index, "exit": code})
            start(index)
    return 1 if failed else 0
