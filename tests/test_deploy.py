"""The deployment artefacts: Dockerfile, compose file, Kubernetes manifests, scripts/replicas.py.

No Docker engine or Kubernetes API server runs here, so the files are checked for the
properties users rely on (parsed with a real YAML parser), every ``AGENTD_*`` name in them
is checked against ``Settings``, and ``scripts/replicas.py`` is run for real: it starts
replicas as processes, they answer gRPC health, the image's HEALTHCHECK command passes
against them, and SIGTERM drains them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
COLLECTOR = ROOT / "deploy" / "otel-collector.yaml"
K8S = ROOT / "deploy" / "k8s" / "agentd.yaml"
DEPLOY_README = ROOT / "deploy" / "README.md"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "agentd.json"
MAKE_SECRETS = ROOT / "deploy" / "make-secrets.sh"
REPLICAS = ROOT / "scripts" / "replicas.py"
REPLICA_SERVICES = ("agentd-1", "agentd-2", "agentd-3")
# Names that are not server settings but are real: the CLI's default target.
NON_SETTINGS = {
    "AGENTD_TARGET": ROOT / "client" / "agentd" / "cli" / "main.py",
}
# SIGTERM drain = AGENTD_SHUTDOWN_GRACE_S for runs, then up to 5 s more for open calls
# (serve.py: server.stop(grace + 5)), then a trace flush: what a stop timeout must exceed.
CALL_GRACE_S = 5


# -- helpers -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def healthcheck_argv() -> list[str]:
    """The final stage's HEALTHCHECK command, exec form."""
    (args,) = [rest for keyword, rest in final_stage() if keyword == "HEALTHCHECK"]
    options, _, command = args.partition("CMD ")
    assert "--interval" in options and "--timeout" in options
    argv = json.loads(command)
    assert isinstance(argv, list), "HEALTHCHECK CMD should be exec form (a JSON array)"
    return argv


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def duration_s(text: str | int | float) -> float:
    """Compose durations: '30s', '1m30s', '1h', '500ms', or a bare number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * scale[u] for n, u in parts)


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for each published port, short or long syntax."""
    result = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            result.append((entry.get("host_ip", ""), int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 3:
            result.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            result.append(("", int(parts[0]), int(parts[1])))
        else:
            raise AssertionError(f"port {entry!r} is not published on the host")
    return result


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {K8S.name}, found {len(found)}"
    return found[0]


def settings_from(env: dict[str, str]) -> Settings:
    """Settings built from these AGENTD_* values alone (validates names and values)."""
    values = {k.removeprefix("AGENTD_").lower(): v for k, v in env.items() if k.startswith("AGENTD_")}
    unknown = sorted(k for k in values if k not in Settings.model_fields)
    assert not unknown, f"not agentd settings: {unknown}"
    return Settings(**values)


# -- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_image_runs_as_numeric_non_root_user():
    users = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {users[-1]}: use a numeric non-zero uid, so Kubernetes can check runAsNonRoot"
    )
    pod = k8s("Deployment", "agentd")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsUser"] == int(uid), "the Deployment's runAsUser should be the image's user"


def test_dockerfile_healthcheck_uses_the_grpc_health_protocol_and_sigterm_stops():
    argv = healthcheck_argv()
    code = argv[-1]
    assert argv[0] == "python" and "grpc_health.v1" in code and "HealthCheckRequest" in code
    assert "SERVING" in code and "AGENTD_HEALTH_PORT" in code
    stop = [rest for keyword, rest in final_stage() if keyword == "STOPSIGNAL"]
    assert stop == ["SIGTERM"]
    cmd = [json.loads(rest) for keyword, rest in final_stage() if keyword == "CMD"]
    assert cmd and cmd[-1][:2] == ["agentd", "serve"], "CMD should be exec form so agentd is PID 1 and gets SIGTERM"
    expose = [rest for keyword, rest in final_stage() if keyword == "EXPOSE"]
    env = " ".join(rest for keyword, rest in final_stage() if keyword == "ENV")
    assert expose == ["50051 50052"] and "AGENTD_PORT=50051" in env and "AGENTD_HOST=0.0.0.0" in env
    assert "AGENTD_HEALTH_PORT=50052" in env


def test_dockerfile_installs_the_server_extras_only_and_ignores_what_it_does_not_need():
    text = DOCKERFILE.read_text()
    installs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN" and "pip install" in rest]
    # The server and the event loop it runs fastest on; never the dev tools.
    assert installs and all("[server,uvloop]" in rest for rest in installs if "." in rest.split("pip install")[-1])
    assert "[dev]" not in text and "tests" not in [r.split()[0] for k, r in final_stage() if k == "COPY"]
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for needed in (".venv", ".git", "tests", "**/__pycache__"):
        assert needed in ignored, f".dockerignore should exclude {needed}"
    sources = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in rest:
            sources.extend(rest.split()[:-1])
    assert {"pyproject.toml", "README.md", "server", "client", "generated"} <= set(sources)
    # The default app ships inside the installed package: the image needs no examples/ copy.
    env = " ".join(rest for keyword, rest in final_stage() if keyword == "ENV")
    assert "examples" not in sources and "AGENTD_APP=agentd.examples.support:app" in env
    assert (ROOT / "server" / "agentd" / "examples" / "support.py").exists()
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
        hit = [p for p in ignored if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(source, p.removeprefix("**/"))]
        assert not hit, f"COPY {source} but .dockerignore excludes it ({hit})"


# -- docker compose -------------------------------------------------------------------------


def test_compose_runs_three_replicas_on_distinct_ports_and_replica_ids():
    services = compose()["services"]
    ids, host_ports = set(), set()
    for name in REPLICA_SERVICES:
        service = services[name]
        env = compose_env(service)
        ids.add(env["AGENTD_REPLICA_ID"])
        assert env["AGENTD_HOST"] == "0.0.0.0"
        assert env["AGENTD_STORE"] == "postgres" and env["AGENTD_RUN_STORE"] == "redis"
        assert env["AGENTD_POSTGRES_URL"].startswith("postgresql://") and "@postgres:5432/" in env["AGENTD_POSTGRES_URL"]
        assert env["AGENTD_REDIS_URL"].startswith("redis://redis:6379")
        assert env["OTEL_SERVICE_NAME"] == "agentd"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        settings = settings_from(env)  # every name is a setting and every value validates
        assert settings.resolved_run_store() == "redis" and settings.auto_migrate is False
        ((host_ip, host_port, container_port),) = published_ports(service)
        assert host_ip == "127.0.0.1" and container_port == settings.port
        host_ports.add(host_port)
        assert service["build"]["context"] == ".." and (COMPOSE.parent / ".." / "Dockerfile").exists()
    assert ids == set(REPLICA_SERVICES)
    assert host_ports == {50051, 50052, 50053}, "clients balance over 127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053"


def test_compose_replicas_wait_for_healthy_stores_and_the_migration():
    services = compose()["services"]
    for name in REPLICA_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    migrate = services["migrate"]
    command = migrate["command"] if isinstance(migrate["command"], list) else shlex.split(migrate["command"])
    assert command[-3:] == ["agentd", "db", "migrate"] or command[-2:] == ["db", "migrate"]
    assert str(migrate.get("restart", "no")) == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["depends_on"]["redis"]["condition"] == "service_healthy"
    # `agentd db migrate` migrates the session store, the trace archive and the run store
    # the settings select: it must see exactly the replicas' storage settings.
    replica = settings_from(compose_env(services["agentd-1"]))
    migration = settings_from(compose_env(migrate))
    for name in ("store", "postgres_url", "postgres_schema", "redis_url", "redis_prefix", "trace_store"):
        assert getattr(migration, name) == getattr(replica, name), f"the migration must use the replicas' {name}"
    assert migration.resolved_run_store() == replica.resolved_run_store()
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for store in ("postgres", "redis"):
        assert services[store]["healthcheck"]["test"], f"{store} needs a healthcheck for service_healthy"
        assert "ports" not in services[store], f"{store} should stay on the compose network"


def test_compose_replicas_drain_within_their_stop_grace_period_and_health_check_over_grpc():
    services = compose()["services"]
    docker_code = healthcheck_argv()[-1]
    for name in REPLICA_SERVICES:
        service = services[name]
        grace = settings_from(compose_env(service)).shutdown_grace_s
        stop = duration_s(service["stop_grace_period"])
        assert stop > grace + CALL_GRACE_S, (
            f"{name}: stop_grace_period {stop}s must exceed the drain ({grace}s + {CALL_GRACE_S}s)"
        )
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and test[3] == docker_code, "same check as the image's HEALTHCHECK"


def test_compose_replicas_serve_tls_and_authenticate_from_the_secrets_folder():
    """Exposed on 0.0.0.0, every replica speaks TLS and checks API keys; deploy/make-secrets.sh
    writes what they mount (tests/test_auth.py serves with its output)."""
    services = compose()["services"]
    for name in REPLICA_SERVICES:
        service = services[name]
        settings = settings_from(compose_env(service))
        assert settings.host == "0.0.0.0" and not settings.insecure
        assert "./secrets:/run/agentd:ro" in service["volumes"]
        for path in (settings.tls_cert_file, settings.tls_key_file, settings.api_keys_file):
            assert path is not None and str(path).startswith("/run/agentd/")
    assert (ROOT / "deploy" / "make-secrets.sh").stat().st_mode & 0o111


def test_compose_traces_go_through_the_collector_to_jaeger():
    services = compose()["services"]
    collector = services["otel-collector"]
    mounts = [str(v) for v in collector["volumes"]]
    assert any(m.startswith("./otel-collector.yaml:") for m in mounts)
    config_path = next(m.split(":")[1] for m in mounts if m.startswith("./otel-collector.yaml:"))
    assert any(config_path in str(arg) for arg in collector.get("command", [])) or config_path.startswith("/etc/otelcol")
    assert any(port == 16686 for _, port, _ in published_ports(services["jaeger"])), "the Jaeger UI is published"

    config = yaml.safe_load(COLLECTOR.read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317" and protocols["http"]["endpoint"] == "0.0.0.0:4318"
    pipelines = config["service"]["pipelines"]
    for signal_name in ("traces", "metrics"):  # agentd exports both when OTLP is on
        pipeline = pipelines[signal_name]
        assert pipeline["receivers"] == ["otlp"]
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{signal_name} pipeline uses undefined {kind[:-1]} {component}"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]
    (jaeger_exporter,) = pipelines["traces"]["exporters"]
    assert jaeger_exporter.split("/")[0] in ("otlp_grpc", "otlp")
    host, port = config["exporters"][jaeger_exporter]["endpoint"].rsplit(":", 1)
    assert host in services and host == "jaeger" and port == "4317"
    endpoint = compose_env(services["agentd-1"])["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint.removeprefix("http://").split(":")[0] in services


# -- metrics: Prometheus, alerts, Grafana ----------------------------------------------------


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host path relative to deploy/, container path, options) of a service's bind mounts."""
    mounts = []
    for volume in service.get("volumes", []):
        parts = str(volume).split(":")
        if parts[0].startswith(("./", "../", "/")):
            mounts.append((parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    return mounts


def test_compose_prometheus_and_grafana_are_pinned_with_read_only_config():
    services = compose()["services"]
    volumes = compose()["volumes"]
    secret_files = set(re.findall(r">\s*([\w.-]+)\s*$", MAKE_SECRETS.read_text(), re.M))
    for name in ("prometheus", "grafana", "otel-collector"):
        service = services[name]
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin the image to a release ({image})"
        for source, target, options in bind_mounts(service):
            assert options == "ro", f"{name}: mount {source} read-only"
            if source.startswith("./secrets/"):
                # Made by deploy/make-secrets.sh (deploy/secrets/ is git-ignored).
                assert source.removeprefix("./secrets/") in secret_files, f"{name}: make-secrets.sh does not write {source}"
            else:
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
        for volume in service.get("volumes", []):
            if not str(volume).startswith((".", "/")):
                assert str(volume).split(":")[0] in volumes, f"{name}: undeclared volume {volume}"
        for host, port, _ in published_ports(service):
            assert host == "127.0.0.1", f"{name}: publish {port} on loopback only"
    assert [(p, t) for _, p, t in published_ports(services["prometheus"])] == [(9090, 9090)]
    assert [(p, t) for _, p, t in published_ports(services["grafana"])] == [(3000, 3000)]

    # Prometheus reads the mounted config and rules, and scrapes the Collector's exporter.
    prometheus = services["prometheus"]
    mounts = {target: source for source, target, _ in bind_mounts(prometheus)}
    config_file = next(arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file="))
    assert mounts[config_file] == "./prometheus/prometheus.yml"
    config = yaml.safe_load(PROMETHEUS.read_text())
    for rule_file in config["rule_files"]:
        assert mounts.get(rule_file) == "./prometheus/alerts.yml"
    (scrape,) = [job for job in config["scrape_configs"] if job["job_name"] == "otel-collector"]
    assert scrape["honor_labels"] is True, "keep the job/instance labels the Collector sets per replica"
    (target,) = scrape["static_configs"][0]["targets"]
    host, port = target.rsplit(":", 1)
    collector = yaml.safe_load(COLLECTOR.read_text())
    assert host in services and port == collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]

    # Grafana: admin password from the secrets folder (never in the file), provisioning mounted.
    grafana = services["grafana"]
    env = compose_env(grafana)
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    mounts = {target: source for source, target, _ in bind_mounts(grafana)}
    assert mounts[env["GF_SECURITY_ADMIN_PASSWORD__FILE"]] == "./secrets/grafana-admin-password"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    url_host, url_port = datasource["url"].removeprefix("http://").split(":")
    assert url_host == "prometheus" and [(p, t) for _, p, t in published_ports(services["prometheus"])][0][1] == int(url_port)
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "agentd.yml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(provider["options"]["path"] + "/")

    # Every replica names itself in its metrics' resource: the `instance` label.
    for name in REPLICA_SERVICES:
        replica = compose_env(services[name])
        assert replica["OTEL_RESOURCE_ATTRIBUTES"] == f"service.instance.id={replica['AGENTD_REPLICA_ID']}"
        # A live replica exports several times before the Collector would expire its series.
        expiration_s = duration_s(collector["exporters"]["prometheus"]["metric_expiration"])
        assert int(replica["OTEL_METRIC_EXPORT_INTERVAL"]) / 1000 * 3 <= expiration_s


def test_alert_rules_parse_and_cover_what_operators_need():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    names = []
    for group in groups:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] and rule["expr"].strip()
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            assert rule["annotations"]["summary"]
            if "for" in rule:
                duration_s(rule["for"])
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    assert {"AgentdRunErrorRateHigh", "AgentdCostPerHourHigh", "AgentdRunP95Slow", "AgentdQueueGrowing",
            "AgentdLeaseRenewalsFailing", "AgentdReplicaStoppedHoldingLeases"} <= set(names)
    text = ALERTS.read_text()
    assert "[10m]" in text and "> 0.05" in text, "error rate above 5% over 10 minutes"
    assert text.count("PLACEHOLDER") >= 3, "thresholds that depend on the deployment say so"


def test_dashboard_is_a_provisionable_grafana_dashboard():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    ids, expressions = set(), []
    for panel in board["panels"]:
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        expressions += [target["expr"] for target in panel["targets"]]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource["uid"]


# -- Kubernetes ------------------------------------------------------------------------------


def test_k8s_manifest_is_namespace_agnostic_and_complete():
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "Job", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds
    assert all("namespace" not in d["metadata"] for d in docs), "apply it with -n NAMESPACE"


def test_k8s_deployment_probes_drain_and_security():
    deployment = k8s("Deployment", "agentd")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    port, health = container["ports"]
    assert port["containerPort"] == 50051 and port["name"] == "grpc"
    assert health["containerPort"] == 50052 and health["name"] == "health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        # Native gRPC probes cannot speak TLS: they ask the plaintext health-only port.
        assert container[probe]["grpc"]["port"] == health["containerPort"], f"{probe} should be the native grpc probe"
    assert container["resources"]["requests"] and container["resources"]["limits"]

    config = k8s("ConfigMap", "agentd-config")["data"]
    secret = k8s("Secret", "agentd-secrets")["stringData"]
    refs = {(k, v["name"]) for ref in container["envFrom"] for k, v in ref.items()}
    assert refs == {("configMapRef", "agentd-config"), ("secretRef", "agentd-secrets")}
    assert {"AGENTD_POSTGRES_URL", "AGENTD_REDIS_URL"} <= set(secret)
    (replica_id,) = [e for e in container["env"] if e["name"] == "AGENTD_REPLICA_ID"]
    assert replica_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    settings = settings_from({**config, **secret})
    assert settings.store == "postgres" and settings.resolved_run_store() == "redis"
    assert settings.port == port["containerPort"] and settings.host == "0.0.0.0"
    assert settings.health_port == health["containerPort"]
    # Exposed on 0.0.0.0, so it serves TLS and authenticates callers (README, Security).
    assert settings.tls_cert_file and settings.tls_key_file and settings.api_keys_file
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets[mounts[str(settings.tls_cert_file.parent)]] == "agentd-tls"
    assert secrets[mounts[str(settings.api_keys_file.parent)]] == "agentd-api-keys"

    pre_stop = container["lifecycle"]["preStop"]
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep"
        sleep_s = float(command[1])
    else:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    assert sleep_s >= 2, "give endpoint removal time to propagate before SIGTERM"
    needed = sleep_s + settings.shutdown_grace_s + CALL_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > needed, (
        f"terminationGracePeriodSeconds must exceed preStop ({sleep_s}s) + drain ({settings.shutdown_grace_s}s"
        f" + {CALL_GRACE_S}s)"
    )
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_k8s_headless_service_migration_job_and_disruption_budget():
    deployment = k8s("Deployment", "agentd")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = k8s("Service", "agentd-headless")["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"].items() <= pod_labels.items()
    (port,) = service["ports"]
    assert port["port"] == 50051 and port["targetPort"] in ("grpc", 50051)

    job = k8s("Job")["spec"]["template"]["spec"]
    (migrate,) = job["containers"]
    command = migrate.get("command", []) + migrate.get("args", [])
    assert command[-3:] == ["agentd", "db", "migrate"]
    assert job["restartPolicy"] in ("OnFailure", "Never")
    assert job["securityContext"]["runAsNonRoot"] is True
    assert migrate["envFrom"] == deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert migrate["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]

    pdb = k8s("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert ("maxUnavailable" in pdb and pdb["maxUnavailable"] < deployment["spec"]["replicas"]) or (
        0 < pdb["minAvailable"] < deployment["spec"]["replicas"]
    )


def test_k8s_readme_target_names_the_headless_service():
    text = DEPLOY_README.read_text()
    assert "dns:///agentd-headless." in text and "round_robin" in text


# -- every AGENTD_* name is a real setting ---------------------------------------------------


def test_every_agentd_variable_in_the_deploy_files_is_a_setting():
    files = [DOCKERFILE, COMPOSE, K8S, DEPLOY_README, REPLICAS, COLLECTOR, PROMETHEUS, ALERTS, DASHBOARD, MAKE_SECRETS]
    names: dict[str, set[str]] = {}
    for path in files:
        for name in re.findall(r"\bAGENTD_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            names.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    assert "AGENTD_REPLICA_ID" in names and "AGENTD_RUN_STORE" in names
    unknown = {}
    for name, where in sorted(names.items()):
        if name in NON_SETTINGS:
            assert name in NON_SETTINGS[name].read_text(), f"{name} is no longer read by {NON_SETTINGS[name]}"
            continue
        if name.removeprefix("AGENTD_").lower() not in Settings.model_fields:
            unknown[name] = sorted(where)
    assert not unknown, f"AGENTD_* names that are not Settings fields (typos?): {unknown}"


# -- scripts/replicas.py, for real --------------------------------------------------------------


class Script:
    """scripts/replicas.py as a subprocess in its own process group, its output read line by line."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.marker = uuid.uuid4().hex
        self.process = subprocess.Popen(
            [sys.executable, str(REPLICAS), *args],
            cwd=ROOT, env={**env, "AGENTD_TEST_DEPLOY_MARKER": self.marker},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + self.output)
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the script ended before printing {pattern!r}:\n" + self.output)
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def drain_output(self, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    return
                continue
            if line is None:
                return
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def leftover_processes(self) -> list[int]:
        """Processes still carrying this run's marker in their environment (the replicas)."""
        pids = []
        needle = f"AGENTD_TEST_DEPLOY_MARKER={self.marker}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def kill_all(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "OTEL_", "OPENAI_"))}
    env.update(AGENTD_STORE="memory", AGENTD_RUN_STORE="memory", AGENTD_SHUTDOWN_GRACE_S="2",
               AGENTD_MODEL_PROVIDER="scripted")
    return env


@pytest.fixture
def scripts() -> Iterator[list[Script]]:
    started: list[Script] = []
    yield started
    for script in started:
        script.kill_all()


def consecutive_free_ports(count: int) -> int:
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            if base + count > 65535:
                continue
            others = []
            try:
                for port in range(base + 1, base + count):
                    sock = socket.socket()
                    others.append(sock)
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            finally:
                for sock in others:
                    sock.close()
        return base
    raise AssertionError("no consecutive free ports")


def health(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def run_healthcheck(port: int) -> int:
    """The image's HEALTHCHECK command, run with this interpreter against a local port
    (a plaintext replica serves health on its main port too)."""
    argv = healthcheck_argv()
    env = {**os.environ, "AGENTD_HEALTH_PORT": str(port)}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30).returncode


def test_replicas_script_starts_serving_replicas_and_drains_them_on_sigterm(script_env, scripts):
    # The script kills replicas still running --stop-timeout seconds after SIGTERM: an hour here,
    # so every replica ends by draining (or the test's guard calls it a hang), however slow the
    # machine, and a clean exit of each proves the drain.
    base = consecutive_free_ports(2)
    script = Script("--count", "2", "--base-port", str(base), "--stop-timeout", "3600", env=script_env)
    scripts.append(script)
    match = script.wait_for(r"^target: (ipv4:\S+)$", timeout=90)
    target = match.group(1)
    addresses = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    assert target == "ipv4:" + ",".join(addresses)

    for address in addresses:
        assert health(address) == "SERVING"
        assert health(address, "agentd.v1.AgentService") == "SERVING"
    # Each replica is its own process with its own AGENTD_REPLICA_ID.
    pids = [int(m) for m in re.findall(r"replica-\d+\s+pid (\d+)", script.output)]
    assert len(pids) == 2
    replica_ids = set()
    for pid in pids:
        environ = dict(
            item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
        )
        replica_ids.add(environ[b"AGENTD_REPLICA_ID"].decode())
        assert environ[b"AGENTD_STORE"] == b"memory" and environ[b"AGENTD_RUN_STORE"] == b"memory"
    assert replica_ids == {"replica-1", "replica-2"}
    assert "[replica-1] " in script.output and "[replica-2] " in script.output

    # The printed target works as one round-robin channel (the service config deploy/README.md shows).
    config = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
    with grpc.insecure_channel(target, options=[("grpc.service_config", json.dumps(config))]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(4):
            response = stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
            assert response.status == health_pb2.HealthCheckResponse.SERVING

    # The image's HEALTHCHECK command passes against a replica and fails against a closed port.
    assert run_healthcheck(base) == 0
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        assert run_healthcheck(closed.getsockname()[1]) != 0

    script.process.send_signal(signal.SIGTERM)
    try:
        code = script.process.wait(timeout=120)  # a bound on a hang, not a measured time
    except subprocess.TimeoutExpired:
        script.drain_output()
        pytest.fail("the replicas did not drain after SIGTERM:\n" + script.output, pytrace=False)
    script.drain_output()
    assert code == 0, script.output
    exits = re.findall(r"replicas: (replica-\d+) \(pid \d+\) exited with (.+)$", script.output, re.M)
    assert sorted(exits) == [("replica-1", "exit code 0"), ("replica-2", "exit code 0")], script.output
    assert "killing" not in script.output, script.output
    assert "shutdown requested" in script.output and "replicas: all replicas stopped" in script.output
    assert script.leftover_processes() == []


def assert_failed_fast(script: Script, logs: Path, error: str) -> str:
    """The script stopped every replica once one could not start: exit 1, no target, the log of
    the replica that could not start shows ``error``, and every other log either shows its own
    error too or says the script stopped that replica and why (none is left empty). Which replica
    fails first, and how far the others got by then, is up to the scheduler. Returns the name of
    the replica the script reported."""
    code = script.process.wait(timeout=60)
    script.drain_output()
    assert code == 1, script.output
    failed = re.search(r"replicas: (replica-\d+) stopped before it was ready \(see (\S+)\)", script.output)
    assert failed, script.output
    assert Path(failed.group(2)) == logs / f"{failed.group(1)}.log"
    assert error in Path(failed.group(2)).read_text()
    assert "target:" not in script.output
    for name in ("replica-1", "replica-2"):
        log = (logs / f"{name}.log").read_text()
        stopped = f"replicas: stopped {name} before it was ready, because {failed.group(1)} could not start"
        assert error in log or stopped in log, f"{name}.log:\n{log}\n{script.output}"
    assert script.leftover_processes() == []
    return failed.group(1)


def test_replicas_script_fails_fast_when_a_replica_cannot_start(script_env, scripts, tmp_path):
    logs = tmp_path / "logs"
    script = Script("--count", "2", "--base-port", "0", "--log-dir", str(logs), "--",
                    "--app", "no_such_module:app", env=script_env)
    scripts.append(script)
    assert_failed_fast(script, logs, "cannot import app module 'no_such_module'")


def test_replicas_script_says_why_it_stopped_a_replica_that_was_still_starting(script_env, scripts, tmp_path):
    """The interleaving the test above only sometimes gets (it was flaky when it expected every log
    to show its own import error), made certain: replica-1 cannot import its app while replica-2
    is still importing (it blocks until stopped), so the script stops replica-2 before it reaches
    an error of its own, and replica-2's log says so."""
    (tmp_path / "half_broken_app.py").write_text(
        "import os, threading\n"
        "if os.environ['AGENTD_REPLICA_ID'] == 'replica-1':\n"
        "    raise ImportError('replica-1 is the broken one')\n"
        "threading.Event().wait()  # replica-2: still importing until the script stops it\n"
    )
    env = {**script_env, "PYTHONPATH": str(tmp_path)}
    logs = tmp_path / "logs"
    script = Script("--count", "2", "--base-port", "0", "--log-dir", str(logs), "--",
                    "--app", "half_broken_app:app", env=env)
    scripts.append(script)
    assert assert_failed_fast(script, logs, "replica-1 is the broken one") == "replica-1"
    replica_2 = (logs / "replica-2.log").read_text()
    assert "cannot import" not in replica_2
    assert "replicas: stopped replica-2 before it was ready, because replica-1 could not start (see replica-1.log)" \
        in replica_2


def test_replicas_script_refuses_ports_in_use(script_env, scripts):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        script = Script("--count", "1", "--base-port", str(port), env=script_env)
        scripts.append(script)
        code = script.process.wait(timeout=30)
    script.drain_output()
    assert code == 2 and f"port(s) {port}" in script.output and "already in use" in script.output
