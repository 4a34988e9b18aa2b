"""deploy/k8s/: the manifests parse, validate against the Kubernetes schema (kubernetes-validate,
offline, strict), and agree with each other, with the server's settings, the image, the
compose setup and deploy/haproxy.cfg."""

from __future__ import annotations

import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from server.config import ServeSettings
from tests.cluster import settings_lines
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.30.0"


def documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def ports(service: dict) -> dict[str, int]:
    return {p["name"]: p["port"] for p in service["spec"]["ports"]}


def haproxy_config() -> str:
    return find("ConfigMap", "haproxy")["data"]["haproxy.cfg"]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_each_manifest_validates_against_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises on any error


def test_a_manifest_with_an_error_is_caught():
    broken = find("StatefulSet", "lstm-serve")
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_services_select_their_pods():
    for doc in documents():
        if doc["kind"] in ("StatefulSet", "Deployment"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
            service = find("Service", doc["metadata"]["name"])
            assert service["spec"]["selector"].items() <= labels.items()
            named = {p["name"] for c in doc["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= named


def test_the_replicas_settings_are_the_servers_and_reach_redis():
    replicas = find("StatefulSet", "lstm-serve")
    assert replicas["spec"]["serviceName"] == "lstm-serve"
    assert find("Service", "lstm-serve")["spec"]["clusterIP"] == "None"  # headless: a DNS name per pod
    (container,) = replicas["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    fields = {f"LSTM_SERVE_{name.upper()}": name for name in ServeSettings.model_fields}
    assert env.keys() <= fields.keys(), env.keys() - fields.keys()
    ServeSettings(**{fields[k]: v for k, v in env.items()})  # values the server accepts
    host, port = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", env["LSTM_SERVE_SESSION_STORE"]).groups()
    assert host == "redis" and int(port) == ports(find("Service", "redis"))["redis"]
    image = (ROOT / "Dockerfile").read_text()
    assert ports(find("Service", "lstm-serve")) == {
        "grpc": int(re.search(r"LSTM_SERVE_PORT=(\d+)", image)[1]),
        "metrics": int(re.search(r"LSTM_SERVE_METRICS_PORT=(\d+)", image)[1]),
    }
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    published = {int(p.rsplit(":", 1)[1]) for p in compose["services"]["server"]["ports"]}
    assert published == set(ports(find("Service", "lstm-serve")).values())


def test_haproxy_finds_the_replicas_with_deploy_haproxy_cfgs_settings():
    config = haproxy_config()
    template = re.search(r"server-template replica (\d+) ([\w.-]+):(\d+) .* port (\d+)", config)
    assert int(template[1]) == find("StatefulSet", "lstm-serve")["spec"]["replicas"]
    assert template[2].startswith("lstm-serve.")  # the headless Service
    assert (int(template[3]), int(template[4])) == tuple(ports(find("Service", "lstm-serve")).values())
    assert settings_lines((ROOT / "deploy" / "haproxy.cfg").read_text()) <= settings_lines(config)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (make test-deps)")
def test_haproxy_accepts_the_configmaps_config(tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config())
    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
