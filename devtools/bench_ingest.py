"""Ingest benchmark: the edge (every 200 backed by an acks=all write) against a no-op aiohttp handler.

Both servers run as separate processes, served the same way (uvloop, no access log), measured in
the same run with the same load generator (wrk, at 64 and 256 keep-alive connections), first as
one process each, then as N processes each sharing the port (``--workers``: ``ingest --workers N``
and the no-op server's own). Then the single edge is paced at half its measured maximum (each
connection waits 20 ms between requests) to read its latency under load. Prints a table and writes
JSON to ``bench-results/ingest-<time>.json``.

    python -m devtools.bench_ingest [--duration 10] [--connections 64,256] [--workers 1,2]

Kafka: ``KAFKA_BOOTSTRAP_SERVERS``, else a local broker started (and stopped) for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from deploy.kafka_local import free_port
from deploy.tail import topic_partitions
from deploy.topics import create_topics
from devtools.bench_results import bench_broker, keep_topics_option, write_results
from ingest.config import hash_secret

SECRET = "bench-secret"  # noqa: S105 - a throwaway tenant of the benchmark
TENANT = "bench"
WRK_SCRIPT = r"""
local n = 0
local types = {"SETUP", "CONNECT", "RELEASE"}
request = function()
  n = n + 1
  local path = "/v1/keyyo/bench/notifications?key=bench-secret&account=33123456789"
    .. "&caller=33612345678&callee=33123456789&callref=" .. math.floor(n / 3)
    .. "&type=" .. types[(n % 3) + 1] .. "&version=1&dref=" .. string.format("%032x", math.floor(n / 3))
    .. "&dref_replace=&session_id=&is_acd=0&redirecting_number="
    .. "&tsms=" .. string.format("%d", os.time() * 1000)
  return wrk.format("GET", path)
end
done = function(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, non2xx,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def _wait_port(port: int, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its live children (the workers of a supervisor)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name_end = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or name_end[1] == str(pid):
            total += int(name_end[11]) + int(name_end[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def paced_script(script: Path, delay_ms: int) -> Path:
    """The wrk script with a pause of ``delay_ms`` between a connection's requests."""
    paced = script.with_name(f"paced-{delay_ms}.lua")
    paced.write_text(script.read_text() + f"\ndelay = function() return {delay_ms} end\n")
    return paced


def run_wrk(port: int, connections: int, duration: float, script: Path, pid: int) -> dict[str, Any]:
    """One wrk run; its JSON summary plus the server's CPU use."""
    cpu0 = _cpu_seconds(pid)
    out = subprocess.run(
        [shutil.which("wrk") or "wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "-s", str(script),
         f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True,
    ).stdout
    cpu = _cpu_seconds(pid) - cpu0
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    data: dict[str, Any] = orjson.loads(line.removeprefix("WRKJSON "))
    seconds = data["duration_us"] / 1e6
    ok = data["requests"] - data["non2xx"]
    return {
        "connections": connections, "requests": data["requests"], "ok": ok,
        "non2xx": data["non2xx"], "socket_errors": data["socket_errors"],
        "rps": round(ok / seconds, 1), "p50_ms": data["p50_us"] / 1000,
        "p99_ms": data["p99_us"] / 1000, "max_ms": data["max_us"] / 1000,
        "server_cores": round(cpu / seconds, 2),
    }


async def topic_size(bootstrap: str, topic: str) -> int:
    """Records in a topic (sum of end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        return sum(ends.values())
    finally:
        await consumer.stop()


def main() -> int:
    """Run the benchmark; print the table; write the JSON results."""

    def rps(server: str, workers: int, connections: int) -> float:
        return float(next(r["rps"] for r in results["runs"] if r["server"] == server
                          and r["workers"] == workers and r["connections"] == connections))

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--connections", default="64,256", help="wrk connection counts")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON results")
    keep_topics_option(parser)
    parser.add_argument("--workers", default="1,2",
                        help="process counts of each server to measure (the first is the reference)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.connections.split(",")]
    with bench_broker(args.keep_topics) as bootstrap, tempfile.TemporaryDirectory() as tmp:
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        asyncio.run(create_topics(bootstrap, prefix))
        config = Path(tmp) / "ingest.toml"
        config.write_text(f'[tenants.{TENANT}]\ntoken_sha256 = "{hash_secret(SECRET)}"\n')
        script = Path(tmp) / "bench.lua"
        script.write_text(WRK_SCRIPT)
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KEYYO_TOPIC_PREFIX": prefix}
        results: dict[str, Any] = {"runs": []}
        ok_total = 0
        half: dict[str, Any] = {}
        for workers in [int(w) for w in args.workers.split(",")]:
            edge_port, noop_port, metrics_port = free_port(), free_port(), free_port()
            edge_cmd = [sys.executable, "-m", "deploy.cli", "--log-level", "warning", "ingest",
                        "--config", str(config), "--port", str(edge_port), "--workers", str(workers),
                        "--metrics-port", str(metrics_port)]
            noop_cmd = [sys.executable, "-m", "devtools.noop_server", "--port", str(noop_port),
                        "--workers", str(workers)]
            with _process(edge_cmd, env, edge_port) as edge, _process(noop_cmd, env, noop_port) as noop:
                print(f"{workers} process(es) each: warming up ({bootstrap}, topics {prefix}*)", flush=True)
                ok_total += run_wrk(edge_port, 64, 3, script, edge.pid)["ok"]
                run_wrk(noop_port, 64, 3, script, noop.pid)
                for c in conns:
                    for name, port, pid in (("noop", noop_port, noop.pid), ("edge", edge_port, edge.pid)):
                        print(f"wrk {name} x{workers} c={c} {args.duration:.0f}s ...", flush=True)
                        run = run_wrk(port, c, args.duration, script, pid)
                        run["server"] = name
                        run["workers"] = workers
                        results["runs"].append(run)
                        if name == "edge":
                            ok_total += run["ok"]
                if half:
                    continue
                edge_max = max(r["rps"] for r in results["runs"] if r["server"] == "edge")
                # Half the max: each connection waits 20 ms between requests; a short calibration
                # run tells how many connections give the target rate (latency adds to the pause).
                delay_ms, target = 20, edge_max / 2
                paced = paced_script(script, delay_ms)
                conns_half = max(4, round(target * delay_ms / 1000))
                probe = run_wrk(edge_port, conns_half, 3, paced, edge.pid)
                ok_total += probe["ok"]
                conns_half = max(4, round(conns_half * target / max(probe["rps"], 1.0)))
                print(f"edge paced at half its max ({target:.0f}/s: {conns_half} connections, "
                      f"one request per {delay_ms} ms + latency each) ...", flush=True)
                half = run_wrk(edge_port, conns_half, args.duration, paced, edge.pid)
                half["target_rps"] = round(edge_max / 2, 1)
                half["workers"] = workers
                ok_total += half["ok"]
                results["half_rate"] = half
        topic = prefix + "keyyo.notifications.v1"
        in_topic = asyncio.run(topic_size(bootstrap, topic))
    warmup_note = "warm-up requests (3 s per server) also land in the topic"
    results.update({
        "time": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "edge_200s_measured": ok_total,
        "records_in_topic": in_topic, "records_note": warmup_note,
        "ratios": {
            f"{w}x{c}": round(rps("edge", w, c) / rps("noop", w, c), 3)
            for w in sorted({r["workers"] for r in results["runs"]}) for c in conns
        },
    })
    print(f"\n{'server':6} {'procs':>5} {'conns':>5} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cores':>5} "
          f"{'non2xx':>6}")
    for r in results["runs"]:
        print(f"{r['server']:6} {r['workers']:>5} {r['connections']:>5} {r['rps']:>9.0f} {r['p50_ms']:>7.2f} "
              f"{r['p99_ms']:>7.2f} {r['server_cores']:>5} {r['non2xx']:>6}")
    for key, ratio in results["ratios"].items():
        w, c = key.split("x")
        print(f"edge / no-op throughput, {w} process(es) each, {c} connections: {ratio:.2f}x "
              "(target >= 0.5x)")
    print(f"edge at half its max: target {half['target_rps']}/s, achieved {half['rps']}/s, "
          f"p50 {half['p50_ms']} ms, p99 {half['p99_ms']} ms (target p99 < 50 ms), "
          f"non-2xx {half['non2xx']}, server cores {half['server_cores']}")
    print(f"records in topic: {in_topic} >= 200s measured: {results['edge_200s_measured']} ({warmup_note})")
    write_results(args.out, "ingest", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
