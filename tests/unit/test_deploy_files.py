"""The deployment files, as far as a machine without a container engine or cluster can check them:
they parse; every keyyo-stream command in them is one the CLI accepts; every probe targets a port
the command serves on and a path that port really answers; the example configurations load."""

from __future__ import annotations

import argparse
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
