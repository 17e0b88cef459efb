"""The deployment files, as far as a machine without a container engine or cluster can check them:
they parse; every keyyo-stream command in them is one the CLI accepts; every probe targets a port
the command serves on and a path that port really answers; the example configurations load."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from deploy.cli import build_parser
from ingest.app import build_app
from ingest.config import load_settings
from processors.acd_config import load_acd_config
from processors.action_rules_config import load_rules, parse_rules
from processors.executor import HEALTH_PORT as EXECUTOR_PORT
from processors.keyyo_api import load_executor_config
from processors.observability import ProcessorMetrics, health_server
from processors.registry import PROCESSORS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EDGE_PATHS = {r.get_info().get("path") for r in build_app(load_settings(
    DEPLOY / "ingest.example.toml", env={})).router.resources()}


def served_port(args: argparse.Namespace) -> int:
    """The port a parsed command serves its health endpoints on."""
    if args.command == "ingest":
        return int(args.port)
    if args.command == "execute":
        return int(args.health_port if args.health_port is not None else EXECUTOR_PORT)
    return int(args.health_port if args.health_port is not None else PROCESSORS[args.name].health_port)


STOP_MARGIN_S = 15
"""What a processor's stop takes beyond ``--close-wait``: the producers' and the consumer's bounded
stops (5 s and 10 s)."""


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "keyyo-stream.yaml").read_text()) if d]


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in k8s():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            yield f"{doc['kind']}/{doc['metadata']['name']}", c


def test_compose_commands_parse_and_healthchecks_hit_served_ports() -> None:
    services = compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    ours = {name: s for name, s in services.items() if s.get("image") == "keyyo-stream:latest"}
    assert set(ours) == {"topics", "ingest", "call-records", "acd-stats", "action-rules", "execute-actions"}
    assert {n: s.get("deploy", {}).get("replicas", 1) for n, s in ours.items()} == {
        "topics": 1, "ingest": 1, "call-records": 2, "acd-stats": 2, "action-rules": 2,
        "execute-actions": 2}
    for name, service in ours.items():
        args = build_parser().parse_args(service["command"])
        if name == "topics":
            continue
        if args.command == "process":  # a stop with Kafka away must end before the kill
            assert int(service["stop_grace_period"].rstrip("s")) >= args.close_wait + STOP_MARGIN_S, name
        check = " ".join(service["healthcheck"]["test"])
        port, path = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", check).groups()  # type: ignore[union-attr]
        assert int(port) == served_port(args), name
        assert path in {"/readyz", "/healthz"} and (name != "ingest" or path in EDGE_PATHS)
        if args.command in ("process", "execute"):
            assert args.health_host == "0.0.0.0"  # noqa: S104 - reachable from the probe's side


def test_kubernetes_args_parse_and_probes_hit_served_ports() -> None:
    kinds = sorted(d["kind"] for d in k8s())
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Deployment", "Deployment", "Deployment",
                     "HorizontalPodAutoscaler", "Job", "PodDisruptionBudget", "Secret", "Service"]
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert all((DEPLOY / "k8s" / r).exists() for r in kustomization["resources"])
    by_kind = {d["kind"]: d for d in k8s()}
    deployments = {d["metadata"]["name"]: d for d in k8s() if d["kind"] == "Deployment"}
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    edge = deployments[hpa["scaleTargetRef"]["name"]]
    assert edge["spec"]["template"]["spec"]["containers"][0]["args"][0] == "ingest"
    assert edge["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    pdb = by_kind["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"] == edge["spec"]["selector"]["matchLabels"]
    service = by_kind["Service"]["spec"]
    assert service["selector"] == edge["spec"]["template"]["metadata"]["labels"]
    seen = []
    for where, container in containers():
        args = build_parser().parse_args(container["args"])
        seen.append(args.name if args.command == "process" else args.command)
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                get = container[probe]["httpGet"]
                assert get["port"] == served_port(args), where
                assert get["path"] in {"/readyz", "/healthz"}
                if args.command == "ingest":
                    assert get["path"] in EDGE_PATHS
        if args.command == "process":  # more replicas than input partitions would only stand by
            doc = next(d for d in k8s() if f"{d['kind']}/{d['metadata']['name']}" == where)
            replicas = doc["spec"]["replicas"]
            assert replicas <= PROCESSORS[args.name].input.partitions, where
            grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace >= args.close_wait + STOP_MARGIN_S, where
        declared = {p["containerPort"] for p in container.get("ports", [])}
        if args.command != "topics":
            assert served_port(args) in declared, where
    assert sorted(seen) == ["acd-stats", "action-rules", "call-records", "execute", "ingest", "topics"]


def test_the_example_configurations_load() -> None:
    assert load_settings(DEPLOY / "ingest.example.toml", env={}).tenants
    load_acd_config(DEPLOY / "acd.example.toml")
    config_map = next(d for d in k8s() if d["kind"] == "ConfigMap")["data"]
    assert tomllib.loads(config_map["ingest.toml"])["tenants"]
    assert tomllib.loads(config_map["acd.toml"])["acd"]["interval_minutes"] == 15
    assert parse_rules(tomllib.loads(config_map["rules.toml"])).tenants["acme"].rules
    assert load_rules(DEPLOY / "rules.example.toml").tenants["acme"].schedules
    executor = load_executor_config(DEPLOY / "executor.example.toml")
    assert executor.passwords == {"33123456789": "change-me"}  # from the secrets file it names
    secret = next(d for d in k8s() if d["kind"] == "Secret")["stringData"]
    assert tomllib.loads(secret["executor-secrets.toml"])["lines"]
    keyyo = tomllib.loads(config_map["executor.toml"])["keyyo"]
    assert keyyo["secrets_file"] == "/secrets/executor-secrets.toml"


def test_the_dockerfile_installs_the_project_and_runs_as_a_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    root = DEPLOY.parent
    for source in re.findall(r"^COPY (?!--)(\S+)", text, re.MULTILINE):
        assert (root / source).exists(), source
    assert 'ENTRYPOINT ["keyyo-stream"]' in text and "USER 10001" in text
    assert "pyproject.toml" in text and "pip wheel" in text


@pytest.mark.asyncio(loop_scope="session")
async def test_processor_probe_paths_are_served() -> None:
    ready = {"joined": True, "restored": True, "progressing": True}
    async with health_server("127.0.0.1", 0, ProcessorMetrics("t"), lambda: ready) as port, \
            aiohttp.ClientSession() as session:
        for path in ("/readyz", "/healthz", "/metrics"):
            async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                assert resp.status == 200, path


def test_a_commit_interval_out_of_bounds_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["process", "call-records", "--commit-interval-ms", "100"])
    assert args.commit_interval_ms == 100
    for bad, reason in (("9000", "9000 is outside 0 to 5000 ms"), ("soon", "not a whole number")):
        with pytest.raises(SystemExit):
            parser.parse_args(["process", "call-records", "--commit-interval-ms", bad])
        assert reason in capsys.readouterr().err


def test_a_close_wait_out_of_bounds_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["process", "acd-stats"]).close_wait == 30
    assert parser.parse_args(["process", "call-records", "--close-wait", "12.5"]).close_wait == 12.5
    for bad, reason in (("60", "60 is outside 1 to 45 s"), ("0", "0 is outside"), ("later", "not a number")):
        with pytest.raises(SystemExit):
            parser.parse_args(["process", "call-records", "--close-wait", bad])
        assert reason in capsys.readouterr().err


ALERT_SEVERITIES = {"critical", "warning", "info"}
SCRAPE_LABELS = {"instance", "job"}
"""Labels Prometheus adds to every series it scrapes."""


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def exported_series() -> dict[str, set[str]]:
    """Every series name the edge, the processors and the executor export -> its labels."""
    from ingest.metrics import IngestMetrics
    from processors.executor import ExecutorMetrics

    out: dict[str, set[str]] = {}
    for registry in (IngestMetrics().registry, ProcessorMetrics("p").registry, ExecutorMetrics("g").registry):
        for collector, names in registry._collector_to_names.items():  # private: no public listing
            labels = set(collector._labelnames)  # type: ignore[attr-defined]
            if getattr(collector, "_type", "") == "histogram":
                labels.add("le")
            for name in names:
                out[name] = labels
    return out


def label_values() -> dict[tuple[str, str], set[str]]:
    """The values a label takes, for the labels the rules select on (as the code writes them)."""
    from ingest.metrics import OUTCOMES, IngestMetrics
    from schemas.actions import STATUSES

    return {
        ("keyyo_ingest_requests_total", "outcome"): set(OUTCOMES),
        ("keyyo_ingest_incomplete_template_total", "missing"): set(IngestMetrics().incomplete_template),
        ("keyyo_ingest_config_reloads_total", "result"): set(IngestMetrics().reloads),
        ("keyyo_ingest_previous_key_requests_total", "credential"): set(IngestMetrics().previous_key),
        ("keyyo_processor_failed_transactions_total", "kind"): {"kafka_away", "refused"},  # runtime._failed
        ("keyyo_executor_actions_total", "status"): set(STATUSES),
        ("keyyo_executor_requests_total", "answer"): {"not_sent", "lost"},  # or an HTTP status
    }


def check_promql(where: str, expr: str) -> set[str]:
    """Fail unless ``expr`` names only series the services export, with labels they carry and
    values they write, and groups only by labels its series have; return the labels it keeps."""
    series, values = exported_series(), label_values()
    assert expr.count("(") == expr.count(")"), where
    used = re.findall(r"\b(keyyo_[a-z_]+)\b(\{[^}]*\})?", expr)
    assert used, f"{where}: no keyyo metric"
    available = set(SCRAPE_LABELS)
    for name, selector in used:
        assert name in series, f"{where}: {name} is not a series the services export"
        available |= series[name]
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
            assert label in series[name], f"{where}: {name} has no label {label}"
            known = values.get((name, label))
            assert known is not None, f"{where}: no known values for {name}{{{label}}}"
            wanted = set(value.split("|")) if op in ("=~", "!~") else {value}
            assert wanted <= known, f"{where}: {name}{{{label}}} never takes {wanted - known}"
    kept: set[str] = set()
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (g.strip() for g in grouping.split(",") if g.strip()):
            assert label in available, f"{where}: grouped by {label}, which its series lack"
            kept.add(label)
    return kept


def test_alert_rules_are_complete_and_name_only_what_the_services_export() -> None:
    rules = alert_rules()
    assert len(rules) >= 15
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "two rules share a name"
    for rule in rules:
        where = rule["alert"]
        assert re.fullmatch(r"Keyyo[A-Z][A-Za-z]+", where)
        assert rule["labels"]["severity"] in ALERT_SEVERITIES, where
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], where
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), where
        kept = check_promql(where, rule["expr"])
        for label in re.findall(r"\$labels\.(\w+)", str(rule["annotations"])):
            assert label in kept, f"{where}: the annotations use {label}, which the alert does not keep"


def test_the_grafana_dashboard_plots_only_what_the_services_export() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource"}
    seen = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            where = f"{panel['title']} {target['refId']}"
            kept = check_promql(where, target["expr"])
            legend = set(re.findall(r"\{\{(\w+)\}\}", target["legendFormat"]))
            assert legend <= kept, f"{where}: the legend prints {legend - kept}, which the query drops"
            seen |= set(re.findall(r"\b(keyyo_[a-z]+)_", target["expr"]))
    assert seen == {"keyyo_ingest", "keyyo_processor", "keyyo_executor"}  # every stage has its panels
