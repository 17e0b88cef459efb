"""Pure Python against the compiled build (`make compile`): same inputs, same run, alternating.

Two copies of this tree are made in a temporary folder; one is compiled (``deploy.compiled``: the
modules of ``make compile`` by mypyc and, with cargo, the native fold of call records), the other
stays pure. Each measurement runs in a child process per copy, pure then compiled, ``--rounds``
times:

1. Per record, without Kafka, on contract-shaped simulated traffic: the edge's parsing and
   checking of a notification (``parse_notification``), the call-records logic alone (decode,
   fold, encode the update) and the runtime's step with the timers closing calls, and the
   acd-stats logic alone on call records of the simulator's mix.
2. With ``--kafka``: the drains of ``bench_call_records --no-latency`` and ``bench_acd_stats``
   (exactly-once, raw consumer and runtime-alone baselines in each run) by each copy, against one
   broker (``KAFKA_BOOTSTRAP_SERVERS``, or one started for the run).

Prints the medians and their ratio, writes JSON to ``bench-results/compiled-<time>.json``.

    python -m devtools.bench_compiled [--rounds 3] [--kafka] [--notifications 200000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy import compiled
from devtools.bench_results import bench_broker, keep_topics_option, write_results

START_MS = 1_795_000_000_000
"""The simulated traffic's start (fixed, so both copies get the same input)."""


def measure() -> dict[str, Any]:
    """The per-record figures of the tree this process imports (run in a child)."""
    from devtools.bench_acd_stats import simulated_records
    from devtools.bench_call_records import TENANTS, step_alone
    from devtools.bench_results import logic_alone
    from devtools.simulator import Chaos, Planner, plan_traffic, schedule
    from ingest.parsing import Refusal, parse_notification
    from processors.acd_stats import AcdStatsLogic
    from processors.call_records import CallRecords

    random.seed(2)  # the simulator draws callrefs from the module's generator
    rng = random.Random(2)
    planner = Planner(TENANTS, 8, rng, time_scale=0.2)
    calls = plan_traffic(planner, rate=300, duration=60_000 / 300 / 3.4, start_ms=START_MS, chaos=Chaos())
    queries = [(s.tenant, list(s.params.items()), s.due) for s in schedule(calls, Chaos(), rng)]
    gc.collect()
    started = time.perf_counter()
    notes = [parse_notification(t, params, "127.0.0.1", due) for t, params, due in queries]
    edge_us = (time.perf_counter() - started) / len(queries) * 1e6
    sample = [(n.tenant.encode(), n.to_json()) for n in notes if not isinstance(n, Refusal)]
    del notes, queries, calls
    records = simulated_records(100_000, 200, 4.0, 7, START_MS)
    gc.collect()
    logic = logic_alone(sample, CallRecords())
    step = step_alone(sample)
    acd = logic_alone(records, AcdStatsLogic())
    return {"compiled_modules": compiled.check(), "notifications": len(sample),
            "call_records_step_us": step["us_per_record"], "call_records_logic_us": logic["us_per_record"],
            "decode_us": logic["decode_us"], "edge_parse_us": round(edge_us, 2),
            "acd_records": len(records), "acd_stats_logic_us": acd["us_per_record"]}


PER_RECORD = [("edge_parse_us", "edge: parse and check a notification"),
              ("decode_us", "call-records: decode a notification record"),
              ("call_records_logic_us", "call-records logic alone (decode, fold, encode)"),
              ("call_records_step_us", "call-records: the runtime's step with its timers"),
              ("acd_stats_logic_us", "acd-stats logic alone")]
DRAINS = [("call_records_per_s", "call-records drain, exactly-once"),
          ("call_records_runtime_only_per_s", "  the runtime alone, same input"),
          ("acd_stats_per_s", "acd-stats drain, exactly-once"),
          ("acd_stats_runtime_only_per_s", "  the runtime alone, same input")]


def _child(tree: Path, args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "PYTHONPATH": str(tree)}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_compiled: {' '.join(args)} failed in {tree}:\n{done.stderr[-3000:]}")
    return done.stdout


def _drains(tree: Path, bootstrap: str, notifications: int, out: Path) -> dict[str, float]:
    env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    _child(tree, ["devtools.bench_call_records", "--no-latency", "--notifications", str(notifications),
                  "--out", str(out / "cr")], env)
    _child(tree, ["devtools.bench_acd_stats", "--records", str(notifications), "--out", str(out / "acd")],
           env)
    cr = json.loads(max((out / "cr").glob("*.json")).read_text())["throughput"]
    acd = json.loads(max((out / "acd").glob("*.json")).read_text())["throughput"]
    return {"call_records_per_s": cr["processor"]["records_per_s"],
            "call_records_runtime_only_per_s": cr["runtime_only"]["records_per_s"],
            "acd_stats_per_s": acd["processor"]["records_per_s"],
            "acd_stats_runtime_only_per_s": acd["runtime_only"]["records_per_s"]}


def _table(rows: list[tuple[str, str]], runs: dict[str, list[dict[str, Any]]], faster: str) -> list[str]:
    lines = []
    for key, label in rows:
        pure = statistics.median(r[key] for r in runs["pure"])
        native = statistics.median(r[key] for r in runs["compiled"])
        ratio = pure / native if faster == "lower" else native / pure
        lines.append(f"{label:52} {pure:>10.2f} {native:>10.2f} {ratio:>6.2f}x")
    return lines


def main() -> int:
    """Build the two copies, run the measurements alternating, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each copy")
    parser.add_argument("--kafka", action="store_true", help="also the drains through a broker")
    parser.add_argument("--notifications", type=int, default=200_000,
                        help="records drained per run with --kafka")
    parser.add_argument("--out", default="bench-results")
    keep_topics_option(parser)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return 0
    with tempfile.TemporaryDirectory(prefix="keyyo-compiled-") as tmp:
        trees = {name: compiled.copy_tree(Path(tmp) / name) for name in ("pure", "compiled")}
        print(f"compiling {len(compiled.MODULES)} modules of a copy with mypyc ...", flush=True)
        try:
            build_s = compiled.build(trees["compiled"])
        except compiled.CompiledError as exc:
            print(f"bench_compiled: {exc}", file=sys.stderr)
            return 2
        results: dict[str, Any] = {"time": datetime.now(tz=UTC).isoformat(timespec="seconds"),
                                   "modules": list(compiled.MODULES), "build_s": round(build_s, 1),
                                   "per_record": {"pure": [], "compiled": []},
                                   "drains": {"pure": [], "compiled": []}}
        for r in range(args.rounds):
            for name, tree in trees.items():
                print(f"round {r + 1}/{args.rounds}: per-record work, {name} ...", flush=True)
                got = json.loads(_child(tree, ["devtools.bench_compiled", "--measure"]))
                assert (got["compiled_modules"] > 0) == (name == "compiled"), got
                results["per_record"][name].append(got)
        if args.kafka:
            with bench_broker(args.keep_topics) as bootstrap:
                for r in range(args.rounds):
                    for name, tree in trees.items():
                        print(f"round {r + 1}/{args.rounds}: drains through Kafka, {name} ...", flush=True)
                        out = Path(tmp) / f"out-{name}-{r}"
                        results["drains"][name].append(_drains(tree, bootstrap, args.notifications, out))
    print(f"\n{'medians of ' + str(args.rounds) + ' runs':52} {'pure':>10} {'compiled':>10} {'ratio':>7}")
    print("µs per record (lower is better)")
    for line in _table(PER_RECORD, results["per_record"], "lower"):
        print(line)
    if args.kafka:
        print("records per second (higher is better)")
        for line in _table(DRAINS, results["drains"], "higher"):
            print(line)
    write_results(args.out, "compiled", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
