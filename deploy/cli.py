"""``keyyo-stream``: one console script, one subcommand per job (``--help`` on each)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from deploy import compiled as compiled_build
from deploy import logs

if TYPE_CHECKING:
    from processors.registry import ProcessorSpec

Handler = Callable[[argparse.Namespace], int]
T = TypeVar("T", int, float)


def _bootstrap(args: argparse.Namespace) -> str:
    return str(args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "127.0.0.1:9092")


def cmd_kafka(args: argparse.Namespace) -> int:
    """Start, stop or query the local broker (or cluster of brokers)."""
    from deploy.kafka_local import LocalCluster, default_home

    cluster = LocalCluster(home=Path(args.home) if args.home else default_home(args.port),
                           port=args.port, brokers=args.brokers)
    nodes = cluster.nodes()
    if args.action == "start":
        try:
            started = cluster.start()
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for node in nodes:
            state = "started" if node.node_id in started else "already running"
            print(f"broker {node.node_id}: {state} port={node.port} (logs: {node.log_file})")
        print(f"bootstrap={cluster.bootstrap}")
        return 0
    if args.action == "stop":
        stopped = cluster.stop()
        for node in nodes:
            print(f"broker {node.node_id}: {'stopped' if node.node_id in stopped else 'not running'}")
        return 0
    running = 0
    for node in nodes:
        pid = node.pid()
        up = node.running()
        running += up
        print(f"broker {node.node_id}: {'running' if up else 'stopped'} port={node.port} "
              f"pid={pid if up else '-'} home={node.home}")
    print(f"bootstrap={cluster.bootstrap}")
    return 0 if running == len(nodes) else 3


def cmd_topics(args: argparse.Namespace) -> int:
    """Create every declared topic (idempotent)."""
    from deploy.topics import create_topics

    prefix = args.prefix if args.prefix is not None else os.environ.get("KEYYO_TOPIC_PREFIX", "")
    result = asyncio.run(create_topics(_bootstrap(args), prefix, partitions=args.partitions))
    for name, state in result.items():
        print(f"{state:8} {name}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Run the HTTP ingest edge."""
    from ingest.app import serve
    from ingest.config import ConfigError, IngestSettings, load_settings

    def load() -> IngestSettings:  # at start, and again on SIGHUP
        loaded = load_settings(Path(args.config))
        if args.worker is not None and loaded.spool_dir is not None:  # one of several: its own spool
            loaded = dataclasses.replace(loaded, spool_dir=loaded.spool_dir / f"worker-{args.worker}")
        return loaded

    try:
        settings = load()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics_port = args.metrics_port if args.metrics_port is not None else args.port + 1
    if args.workers > 1:
        from ingest.workers import run_workers

        return run_workers(Path(args.config), args.host, args.port, args.workers, args.metrics_host,
                           metrics_port, args.log_level, args.log_format, args.uvloop)
    own_port = None
    if args.worker is not None:  # one of several: own port for metrics and probes
        own_port = (args.metrics_host, metrics_port)
    _before_serving(args.uvloop)
    serve(settings, args.host, args.port, reuse_port=args.worker is not None, own_port=own_port,
          reload=load)
    return 0


def cmd_url(args: argparse.Namespace) -> int:
    """Print the notification URL template for the Keyyo Manager."""
    from ingest.parsing import notification_url_template

    print(notification_url_template(args.base, args.tenant))
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    """Make a new tenant secret and print the config lines that go with it."""
    from ingest.config import hash_secret

    secret = secrets.token_urlsafe(24)
    if args.api:
        print(f"# actions API token for {args.tenant}: send it as Authorization: Bearer {secret}")
        print(f"# add to [tenants.{args.tenant}]:")
        print(f'api_token_sha256 = "{hash_secret(secret)}"')
        return 0
    print(f"# secret for {args.tenant}: put it in the Keyyo URL as key={secret}")
    print(f"[tenants.{args.tenant}]")
    print(f'token_sha256 = "{hash_secret(secret)}"')
    print('# allow_from = ["62.39.136.157/32", "83.136.160.79/32"]')
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the pipeline's topics and consumer groups as Kafka has them; 1 if problems."""
    from aiokafka.errors import KafkaError

    from deploy.status import collect, render
    from processors.registry import PROCESSORS

    groups: dict[str, str] = {}
    for item in args.group:
        name, _, group = item.partition("=")
        if name not in (*PROCESSORS, "execute-actions") or not group:
            print(f"error: --group {item!r}: expected NAME=GROUP, NAME one of "
                  f"{', '.join((*PROCESSORS, 'execute-actions'))}", file=sys.stderr)
            return 2
        groups[name] = group
    prefix = args.prefix if args.prefix is not None else os.environ.get("KEYYO_TOPIC_PREFIX", "")
    bootstrap = _bootstrap(args)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its reconnect errors: ours says it once
    try:
        status = asyncio.run(collect(bootstrap, prefix, groups))
    except (KafkaError, OSError) as exc:
        print(f"error: Kafka at {bootstrap} did not answer: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(status.as_dict(), indent=2))
    else:
        print(render(status))
    return 1 if status.problems else 0


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the records of a topic, readably, as they arrive."""
    from deploy.tail import tail

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail(_bootstrap(args), args.topic, args.prefix or "", args.from_beginning,
                         args.max_records, args.timeout, args.raw))
    return 0


def _bounded(convert: Callable[[str], T], low: T, high: T, unit: str, what: str) -> Callable[[str], T]:
    """An option's type: ``convert``'s value, from ``low`` to ``high``; one clear line if not."""
    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value:g} is outside {low:g} to {high:g} {unit}")
        return value

    return parse


_commit_interval = _bounded(int, 0, 5000, "ms", "whole number of milliseconds")
"""``--commit-interval-ms``: 0 to 5000 (a transaction open longer would read as stuck)."""
_close_wait = _bounded(float, 1.0, 45.0, "s", "number of seconds")
"""``--close-wait``: 1 to 45 s (giving partitions up must end within the group's 60 s rebalance
timeout, producer and consumer stops included)."""


def cmd_process(args: argparse.Namespace) -> int:
    """Run a declared processor (one process of its consumer group)."""
    from deploy.topics import provision_processor
    from processors.registry import PROCESSORS
    from processors.service import serve
    from processors.step import Limits

    spec = PROCESSORS[args.name]
    bootstrap = _bootstrap(args)
    prefix = args.prefix if args.prefix is not None else os.environ.get("KEYYO_TOPIC_PREFIX", "")
    out_prefix = args.output_prefix if args.output_prefix is not None else prefix
    settings = spec.settings(
        bootstrap, prefix, out_prefix, group=args.group or spec.group(out_prefix),
        mode=args.mode or spec.default_mode, allowed_lateness_ms=args.lateness_ms,
        until_idle_s=args.until_idle, slice_ms=args.slice_ms or spec.default_slice_ms,
        commit_interval_ms=(args.commit_interval_ms if args.commit_interval_ms is not None
                            else spec.default_commit_interval_ms),
        flush_at_end_ms=int(args.flush_at_end * 1000) if args.flush_at_end is not None else None,
        limits=Limits(max_ahead_ms=int(args.max_ahead * 1000), max_value_bytes=args.max_value_bytes),
        max_attempts=args.max_attempts,
        state_dir=None if args.no_checkpoints else Path(args.state_dir).expanduser(),
        close_wait_s=args.close_wait,
    )
    try:
        logic = spec.logic(**{o.dest: getattr(args, o.dest) for o in spec.options})
    except ValueError as exc:  # a configuration mistake: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def main() -> bool:
        await provision_processor(bootstrap, spec, prefix, out_prefix, settings.group)
        return await serve(settings, logic, args.health_host,
                           args.health_port if args.health_port is not None else spec.health_port,
                           next_free=0 if args.health_port is not None else 100)

    _before_serving(args.uvloop)
    from processors.runtime import GC_THRESHOLD

    gc.set_threshold(*GC_THRESHOLD)  # a processor makes many short-lived objects per record
    try:
        return 0 if asyncio.run(main()) else 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_execute(args: argparse.Namespace) -> int:
    """Run the action executor (one process of its consumer group)."""
    from processors.executor import HEALTH_PORT, ExecutorSettings
    from processors.keyyo_api import ExecutorConfigError, load_executor_config
    from processors.service import serve_executor
    from schemas.topics import ACTION_RESULTS, ACTIONS

    try:
        config = load_executor_config(args.config)
    except ExecutorConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.base_url:
        config = dataclasses.replace(config, base_url=args.base_url.rstrip("/"))
    bootstrap = _bootstrap(args)
    prefix = args.prefix if args.prefix is not None else os.environ.get("KEYYO_TOPIC_PREFIX", "")
    out_prefix = args.output_prefix if args.output_prefix is not None else prefix
    settings = ExecutorSettings(
        bootstrap=bootstrap, group=args.group or f"{out_prefix}keyyo.execute-actions",
        actions_topic=ACTIONS.full_name(prefix), results_topic=ACTION_RESULTS.full_name(out_prefix))

    async def main() -> None:
        from deploy.topics import create_topics

        await create_topics(bootstrap, prefix, topics=(ACTIONS,))
        await create_topics(bootstrap, out_prefix, topics=(ACTION_RESULTS,))
        await serve_executor(settings, config, args.health_host,
                             args.health_port if args.health_port is not None else HEALTH_PORT,
                             next_free=0 if args.health_port is not None else 100)

    from aiokafka.errors import KafkaError

    _before_serving(args.uvloop)
    try:
        asyncio.run(main())
    except (OSError, RuntimeError, KafkaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Run the local emulation of Keyyo's action endpoints."""
    from devtools.sandbox import serve

    return serve(args)


def add_runtime_options(p: argparse.ArgumentParser, spec: ProcessorSpec) -> None:
    """The options every processor takes."""
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--prefix", help="input topic prefix (default $KEYYO_TOPIC_PREFIX or none)")
    p.add_argument("--output-prefix", help="output topic prefix (default: the input prefix)")
    p.add_argument("--group", help="consumer group (default OUTPUT_PREFIX + keyyo.NAME)")
    p.add_argument("--mode", choices=["live", "replay"], default=None,
                   help="live: quiet tenants' time follows the wall clock; replay: event time only "
                        f"(default {spec.default_mode})")
    p.add_argument("--lateness-ms", type=int, default=5000,
                   help="live mode: stream time is at least wall clock minus this")
    p.add_argument("--slice-ms", type=int, default=None,
                   help="processing time per transaction and partition: lower commits more often, "
                        f"higher gives more throughput (default {spec.default_slice_ms})")
    p.add_argument("--commit-interval-ms", type=_commit_interval, default=None,
                   help="a transaction stays open this long taking records as they arrive before it "
                        "commits: fewer transactions when input trickles in, results seen that much "
                        f"later (default {spec.default_commit_interval_ms}; 0 commits at once)")
    p.add_argument("--until-idle", type=float, default=None,
                   help="burst mode: exit after the input has been drained for N seconds")
    p.add_argument("--flush-at-end", type=float, default=None, metavar="SECONDS",
                   help="burst mode: advance stream time by N seconds before exiting")
    p.add_argument("--max-ahead", type=float, default=600.0, metavar="SECONDS",
                   help="an event time further ahead of its record's timestamp (or, live, of the "
                        "wall clock) is dead-lettered")
    p.add_argument("--max-value-bytes", type=int, default=256 * 1024,
                   help="largest output or state value one record may write; larger: dead-lettered")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="transactions Kafka may refuse with a record before it is dead-lettered")
    p.add_argument("--close-wait", type=_close_wait, default=30.0, metavar="SECONDS",
                   help="giving a partition up (stop or rebalance) waits this long for its "
                        "transaction in progress; past it (Kafka away) the transaction is abandoned, "
                        "to be aborted by Kafka or the next owner (default %(default)g, 1 to 45; keep "
                        "the stop grace period above it + 15 s)")
    p.add_argument("--state-dir", default="~/.local/state/keyyo-stream/checkpoints",
                   help="where each partition's state is checkpointed when the process stops or "
                        "gives a partition up, so a restart replays only the changelog's tail "
                        "(default %(default)s; shared safely by the processes of a host)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="write and read no checkpoints: every restore replays the whole changelog")
    p.add_argument("--health-host", default="127.0.0.1")
    p.add_argument("--health-port", type=int, default=None,
                   help=f"side port for /healthz /readyz /metrics (default {spec.health_port}, or the "
                        "next free one when it is busy; 0: any free port)")
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    p.add_argument("--log-level", default=argparse.SUPPRESS, help="as the global --log-level")


def cmd_report(args: argparse.Namespace) -> int:
    """Print a tenant's ACD figures per interval, with a total line (and a plot)."""
    from deploy.report import ReportError, report

    prefix = args.prefix if args.prefix is not None else os.environ.get("KEYYO_TOPIC_PREFIX", "")
    try:
        text, notes = asyncio.run(report(
            _bootstrap(args), prefix, args.tenant, args.queue, args.start, args.end, args.interval,
            args.format, args.timezone, args.plot, args.agents))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Send realistic Keyyo traffic; optionally write the expected records."""
    from devtools.simulate import simulate

    if args.to_kafka and not args.bootstrap:
        args.bootstrap = _bootstrap(args)
    return asyncio.run(simulate(args))


def cmd_run(args: argparse.Namespace) -> int:
    """Local stack: broker, topics, ingest edge and demo traffic."""
    from deploy.local_stack import run_local

    _before_serving(args.uvloop)
    return run_local(args)


def _before_serving(wanted: bool) -> None:
    """Before a long-running service: uvloop if asked (and installed); then what start-up made
    (modules, settings) is moved out of the cyclic garbage collector's sight, so its full
    collections walk only what the service makes (an edge's took 40-70 ms every few seconds at
    1,000 requests/s, each a pause for every request in flight)."""
    gc.collect()
    gc.freeze()
    if not wanted:
        return
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="keyyo-stream",
        description="Keyyo call notifications into Kafka, and what follows from them.",
    )
    parser.add_argument("--log-level", default=os.environ.get("KEYYO_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=["json", "text"],
                        default=os.environ.get("KEYYO_LOG_FORMAT", "json"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("kafka", cmd_kafka, "Run a local Apache Kafka broker, or a cluster of them (KRaft), without "
            "Docker.")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=int(os.environ.get("KEYYO_KAFKA_PORT", "9092")),
                   help="broker port on 127.0.0.1 (default 9092)")
    p.add_argument("--home", help="folder for config, data and logs "
                   "(default ~/.local/state/keyyo-stream/kafka-PORT)")
    p.add_argument("--brokers", type=int, default=1,
                   help="start a cluster of N brokers (KRaft, each also a controller) on ports PORT "
                        "to PORT+N-1, homes HOME/broker-<id>; replication min(3, N), min.insync.replicas "
                        "2 from 3 brokers (default 1; an existing cluster keeps its size)")

    p = add("topics", cmd_topics, "Create every declared topic with its partitions and configs.")
    p.add_argument("action", choices=["create"])
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--prefix", help="topic name prefix (default $KEYYO_TOPIC_PREFIX or none)")
    p.add_argument("--partitions", type=int, help="override every topic's partition count")

    p = add("ingest", cmd_ingest, "Run the HTTP ingest edge (Kafka from $KAFKA_BOOTSTRAP_SERVERS).")
    p.add_argument("--config", required=True, help="TOML file with [tenants.<id>] and [ingest]")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1,
                   help="edge processes sharing the port (SO_REUSEPORT), each with its own Kafka "
                        "producer, spool (<spool_dir>/worker-<i>) and metrics port (default 1)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="with --workers: where each worker's own port listens (default 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="with --workers: worker i serves /metrics, /healthz, /readyz alone on this "
                        "port + i (default --port + 1)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false",
                   help="use the standard asyncio loop")

    from processors.registry import PROCESSORS

    p = add("process", cmd_process, "Run a processor: one process of its consumer group "
            "(run more for more throughput).")
    kinds = p.add_subparsers(dest="name", required=True, metavar="NAME")
    for spec in PROCESSORS.values():
        kp = kinds.add_parser(spec.name, help=spec.description, description=spec.description)
        add_runtime_options(kp, spec)
        for option in spec.options:
            default = f" (default {option.default})" if option.default is not None else ""
            kp.add_argument(f"--{option.name}", type=option.type, default=option.default,
                            help=f"{option.help}{default}")

    p = add("execute", cmd_execute, "Send the decided actions (SMS, calls, profile switches) to "
            "Keyyo's API, at most once, and write their results (run more for more partitions).")
    p.add_argument("what", choices=["actions"])
    p.add_argument("--config", help="TOML file: [keyyo] base_url, auth (digest|ip), timeouts, "
                   "min_interval_seconds, secrets_file; [lines.\"<number>\"] password = SIP password "
                   "(without it: Keyyo's URL, digest, no line can send)")
    p.add_argument("--base-url", help="Keyyo's base URL (overrides the config's; e.g. the sandbox's)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--prefix", help="input topic prefix (default $KEYYO_TOPIC_PREFIX or none)")
    p.add_argument("--output-prefix", help="results topic prefix (default: the input prefix)")
    p.add_argument("--group", help="consumer group (default OUTPUT_PREFIX + keyyo.execute-actions)")
    p.add_argument("--health-host", default="127.0.0.1")
    p.add_argument("--health-port", type=int, default=None,
                   help="side port for /healthz /readyz /metrics (default 9131, or the next free one)")
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false")

    p = add("sandbox", cmd_sandbox, "Run a local emulation of Keyyo's action endpoints (makecall, "
            "sendsms, setprofil) with Digest, the 1 request/s rule and recorded requests.")
    from devtools.sandbox import add_arguments as sandbox_arguments

    sandbox_arguments(p)

    p = add("report", cmd_report, "Read the figures the processors wrote: "
            "`report acd` prints contact-centre figures per interval.")
    p.add_argument("kind", choices=["acd"])
    p.add_argument("--tenant", required=True)
    p.add_argument("--queue", help="one queue (default: every queue of the tenant, added together)")
    p.add_argument("--from", dest="start", metavar="DATE",
                   help="first local day YYYY-MM-DD, or a local time YYYY-MM-DDTHH:MM (default today)")
    p.add_argument("--to", dest="end", metavar="DATE",
                   help="last local day (included), or a local time (excluded) (default: --from's day)")
    p.add_argument("--interval", type=int, choices=[15, 30, 60],
                   help="add intervals up into longer ones (default: as stored)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--timezone", help="zone for dates and regrouping (default: the figures' own)")
    p.add_argument("--agents", action="store_true", help="table: also the agent lines' totals")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the intervals into a PNG")
    p.add_argument("--bootstrap")
    p.add_argument("--prefix")

    p = add("simulate", cmd_simulate, "Send realistic Keyyo notification traffic (and expected records).")
    from devtools.simulate import add_arguments

    add_arguments(p)

    p = add("url", cmd_url, "Print the notification URL template to paste into the Keyyo Manager.")
    p.add_argument("--tenant", required=True)
    p.add_argument("--base", required=True, help="public base URL of the ingest edge")

    p = add("secret", cmd_secret, "Generate a tenant secret and its token_sha256 config entry "
            "(--api: an actions API token and its api_token_sha256 entry).")
    p.add_argument("--tenant", required=True)
    p.add_argument("--api", action="store_true", help="a bearer token for the actions API instead")

    p = add("tail", cmd_tail, "Print a topic's records readably (notifications, rejected, ...).")
    p.add_argument("topic", help="topic base name or short name: notifications, rejected, "
                   "call-updates, call-records, acd-stats, dead-letters, actions, action-results")
    p.add_argument("--bootstrap")
    p.add_argument("--prefix")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--max-records", type=int, default=None, help="exit after N records")
    p.add_argument("--timeout", type=float, default=None, help="exit after N idle seconds")
    p.add_argument("--raw", action="store_true", help="print the JSON values as they are")

    p = add("status", cmd_status, "The pipeline as Kafka sees it: brokers, topics, changelogs, and "
            "each consumer group's state, members and lag; problems listed with what to do (exit 1).")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--prefix", help="topic prefix (default $KEYYO_TOPIC_PREFIX or none)")
    p.add_argument("--group", action="append", default=[], metavar="NAME=GROUP",
                   help="a stage run with its own --group (NAME: call-records, acd-stats, action-rules "
                        "or execute-actions); repeatable")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = add("run", cmd_run, "Local stack on defaults: broker, topics, ingest, every processor "
            "(call-records, acd-stats, action-rules), the action executor against the Keyyo sandbox, "
            "and simulated traffic.")
    p.add_argument("--port", type=int, default=8080, help="ingest port")
    p.add_argument("--processor-port", type=int, default=9101,
                   help="call-records health/metrics port (acd-stats: 9111, or the next free one)")
    p.add_argument("--kafka-port", type=int, default=9092)
    p.add_argument("--sandbox-port", type=int, default=8090, help="the Keyyo sandbox's port")
    p.add_argument("--state-dir", default=".keyyo", help="local config, spool and broker home")
    p.add_argument("--demo-rate", type=float, default=0.3, help="simulated calls per second (0: none)")
    p.add_argument("--time-scale", type=float, default=0.3,
                   help="simulated ring/talk durations scale (1: realistic)")
    p.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keyyo-stream`` console script."""
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        compiled = compiled_build.check()
    except compiled_build.CompiledError as exc:  # never run code older than its source
        print(f"keyyo-stream: {exc}", file=sys.stderr)
        return 2
    if compiled:
        logging.getLogger("keyyo.cli").info(
            "compiled build (make compile)", extra={"compiled_modules": compiled})
    handler: Handler = args.handler
    try:
        return handler(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from aiokafka.errors import KafkaConnectionError  # (imported late: `--help` stays fast)

        if not isinstance(exc, KafkaConnectionError):
            raise
        # No broker where we were told: one line, not a traceback.
        where = _bootstrap(args) if hasattr(args, "bootstrap") else "the configured bootstrap servers"
        print(f"keyyo-stream: cannot reach Kafka at {where}; start one with "
              "`keyyo-stream kafka start`, or point KAFKA_BOOTSTRAP_SERVERS (or --bootstrap) at yours",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
