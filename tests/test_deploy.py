"""Deployment files: the image, Kubernetes manifests, Prometheus rules and the dashboard.

No container engine or cluster runs here, so each file is kept true by the tools
that check it offline (hadolint, kubernetes-validate, kustomize, promtool), by
the same install steps the image runs, and by comparing every metric name the
rules and dashboard query with a real scrape. A test whose tool is missing
skips and names it; in CI (CI=true), where .ci/run installs every tool, it fails.

Kubernetes: every variant is rendered as `kubectl apply -k` would apply it (the
default, deploy/kubernetes, and each folder of deploy/kubernetes-variants) and
checked against the Kubernetes schemas and the gateway's own configuration.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import caller_authenticator
from gateway.config import Config
from gateway.errors import ERROR_BY_RESPONSE_CODE, ConfigError, ExchangeBusy, metric_code
from gateway.serving.server import gunicorn_options
from tests.integration.processes import free_port, gateway_env, http, start

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VARIANTS = DEPLOY / "kubernetes-variants"
# What `kubectl apply -k` takes: the default variant, and each variant built on it.
VARIANTS = {
    "default": KUBERNETES,
    **{path.name: path for path in sorted(KUBERNETES_VARIANTS.iterdir()) if path.is_dir()},
}
# The objects of the in-cluster Redis (components/redis), each named ews-gateway-redis.
REDIS_KINDS = ("Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy")
# What the operator creates beside the manifests, by (kind, name): the files of its volumes.
OPERATOR_CREATED = {
    ("ConfigMap", "ews-gateway-redis-ca"): {"ca.pem": "(the managed Redis's CA certificate)\n"},
}
PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted(PROMETHEUS.glob("*.yaml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yaml"))
RUNBOOK = PROMETHEUS / "RUNBOOK.md"
DASHBOARD = DEPLOY / "grafana" / "ews-gateway.json"

# The oldest Kubernetes minor the manifests must fit; the newest schema at hand is checked too.
OLDEST_KUBERNETES = "1.29"
# Custom resources: no schema offline, so their fields are checked by hand below.
CUSTOM_KINDS = frozenset({"ServiceMonitor"})
# Sample values for the dashboard's variables, to hand its queries to promtool.
DASHBOARD_SAMPLES = {
    "__rate_interval": "5m",
    "job": "ews-gateway",
    "instance": ".*",
    "workers": "2",
    "threads": "32",
}
# A metric that Prometheus itself writes for every target.
SCRAPE_SERIES = frozenset({"up"})
TOOL_TIMEOUT_S = 300

_IDENTIFIER = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_VARIABLE = re.compile(r"\$(\w+)")


# --- helpers -----------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """Find a command beside this interpreter (tools installed in the venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def missing_tool(name: str) -> NoReturn:
    """Skip a test whose tool is missing, naming it; fail instead in CI, which has them all."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{name} not installed, and CI must run every test")
    pytest.skip(f"{name} not installed")


def require_tool(name: str) -> str:
    path = tool(name)
    if path is None:
        missing_tool(name)
    return path


def run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, its output captured for the assertion message."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    command = " ".join(map(str, result.args))
    return f"{command} exited {result.returncode}:\n{result.stdout}{result.stderr}"


def yaml_documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


def kustomization(directory: Path = KUBERNETES) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(
        (directory / "kustomization.yaml").read_text(encoding="utf-8")
    )
    return data


def listed_manifests() -> list[Path]:
    return [KUBERNETES / name for name in kustomization()["resources"]]


def manifests() -> list[dict[str, Any]]:
    """The gateway's own objects: the files deploy/kubernetes lists, before any component."""
    return [
        doc
        for path in listed_manifests()
        for doc in yaml_documents(path.read_text(encoding="utf-8"))
    ]


def only(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for doc in documents
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    return only(manifests(), kind, name)


def pod_template(documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    deployment = only(manifests() if documents is None else documents, "Deployment", "ews-gateway")
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


def gateway_container(documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    containers = pod_template(documents)["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def container_env(documents: list[dict[str, Any]] | None = None) -> dict[str, str]:
    return {item["name"]: item["value"] for item in gateway_container(documents).get("env", [])}


def configmap_data(documents: list[dict[str, Any]] | None = None) -> dict[str, str]:
    configmap = only(manifests() if documents is None else documents, "ConfigMap", "ews-gateway")
    data: dict[str, str] = configmap["data"]
    return data


def schema_versions(validator: Any) -> list[str]:
    """The Kubernetes minor versions kubernetes-validate has schemas for, oldest first."""
    minors = {tuple(map(int, v.split(".")[:2])) for v in validator.utils.all_versions()}
    return [f"{major}.{minor}" for major, minor in sorted(minors)]


def kustomize_command(directory: Path) -> list[str] | None:
    if kustomize := tool("kustomize"):
        return [kustomize, "build", str(directory)]
    if kubectl := tool("kubectl"):
        return [kubectl, "kustomize", str(directory)]
    return None


@functools.cache
def kustomize_output(directory: Path) -> str:
    command = kustomize_command(directory)
    if command is None:
        missing_tool("kustomize (or kubectl, which embeds it)")
    result = run(command)
    assert result.returncode == 0, output(result)
    return result.stdout


def rendered(variant: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k` applies for a variant: `default` or a folder's name."""
    return yaml_documents(kustomize_output(VARIANTS[variant]))


def kustomization_files(directory: Path) -> set[Path]:
    """Every file a kustomization reads: itself, its resources, components and patches."""
    data = kustomization(directory)
    files = {directory / "kustomization.yaml"}
    for entry in data.get("resources", []) + data.get("components", []):
        path = (directory / entry).resolve()
        files |= kustomization_files(path) if path.is_dir() else {path}
    return files | {
        (directory / p["path"]).resolve() for p in data.get("patches", []) if "path" in p
    }


def deployments(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "Deployment"}


def selected_pods(documents: list[dict[str, Any]], selector: dict[str, str]) -> list[str]:
    """The Deployments whose pods a label selector matches."""
    return [
        name
        for name, deployment in deployments(documents).items()
        if selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ]


def file_source(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str, str]:
    """The Secret or ConfigMap (kind, name, key) whose volume holds PATH in a container."""
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        if PurePosixPath(path).parent == PurePosixPath(mount["mountPath"]):
            volume = volumes[mount["name"]]
            if "secret" in volume:
                return ("Secret", volume["secret"]["secretName"], PurePosixPath(path).name)
            if "configMap" in volume:
                return ("ConfigMap", volume["configMap"]["name"], PurePosixPath(path).name)
    raise AssertionError(f"no Secret or ConfigMap volume holds {path}")


def scrape_mechanisms(documents: list[dict[str, Any]]) -> list[str]:
    """What makes Prometheus scrape the gateway: pod annotations, ServiceMonitors, or both."""
    service_labels = only(documents, "Service", "ews-gateway")["metadata"]["labels"]
    found = [
        f"ServiceMonitor {doc['metadata']['name']}"
        for doc in documents
        if doc["kind"] == "ServiceMonitor"
        and doc["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    ]
    for name, deployment in deployments(documents).items():
        annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
        if annotations.get("prometheus.io/scrape") == "true":
            found.append(f"annotations of Deployment {name}")
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [arguments for found, arguments in dockerfile_instructions() if found == keyword]


def doc_section(document: str, title: str) -> str:
    text = (REPO / document).read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def documented_variables() -> set[str]:
    """The variables named in the first column of docs/configuration.md's table."""
    table = doc_section("docs/configuration.md", "The variables")
    rows = re.findall(r"^\| (.+?) \|", table, re.MULTILINE)
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}


def contract_series() -> set[str]:
    """The series docs/operations.md's metrics table promises (histograms as three series)."""
    series = set()
    for name, kind in re.findall(
        r"^\| `(ews_gateway_\w+)` \| (\w+) \|",
        doc_section("docs/operations.md", "Metrics"),
        re.MULTILINE,
    ):
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        series |= {name + suffix for suffix in suffixes}
    return series


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    ]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded_series() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard()["panels"] if panels is None else panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def dashboard_variable_queries() -> list[str]:
    return [
        variable["definition"]
        for variable in dashboard()["templating"]["list"]
        if variable["type"] == "query"
    ]


def queried_series(expression: str) -> set[str]:
    """Metric and recorded-series names in a PromQL expression (not functions or labels)."""
    code = _STRING.sub('""', expression)
    return {
        name
        for name in _IDENTIFIER.findall(code)
        if name.startswith("ews_gateway_") or ":" in name or name in SCRAPE_SERIES
    }


def all_queries() -> list[str]:
    return [rule["expr"] for rule in rules()] + dashboard_queries() + dashboard_variable_queries()


# --- container image ---------------------------------------------------------------------


def test_hadolint_accepts_the_dockerfile() -> None:
    result = run([require_tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, output(result)


def test_both_image_stages_use_the_same_slim_python_pinned_by_digest() -> None:
    """The venv built in the first stage runs on the second stage's interpreter."""
    images = {arguments.split()[0] for arguments in dockerfile("FROM")}
    assert len(dockerfile("FROM")) == 2
    assert len(images) == 1, images
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", images.pop())


def test_the_image_installs_only_the_locked_hashed_dependencies() -> None:
    [install] = [step for step in dockerfile("RUN") if "pip install" in step]
    assert "--no-deps --require-hashes -r requirements.lock" in install
    assert "--no-deps /wheels/*.whl" in install
    assert "--no-build-isolation" in install


def test_the_image_serves_as_the_pods_user_on_the_pods_port() -> None:
    entrypoint = json.loads(dockerfile("ENTRYPOINT")[-1])
    command = json.loads(dockerfile("CMD")[-1])
    assert entrypoint + command == ["ews-gateway", "serve"]
    assert entrypoint + gateway_container()["args"] == ["ews-gateway", "serve"]
    user, _, group = dockerfile("USER")[-1].partition(":")
    pod_security = pod_template()["spec"]["securityContext"]
    assert (int(user), int(group)) == (pod_security["runAsUser"], pod_security["runAsGroup"])
    [port] = gateway_container()["ports"]
    assert dockerfile("EXPOSE") == [str(port["containerPort"])]
    [healthcheck] = dockerfile("HEALTHCHECK")
    assert "/livez" in healthcheck
    assert "urllib" in healthcheck


INSPECT_INSTALLED = """
import json
from importlib import resources
import gateway, gateway.simulator
root = resources.files("gateway")
print(json.dumps({
    "package": gateway.__file__,
    "wsdl": str(root.joinpath("wsdl", "um.wsdl")),
    "openapi": str(root.joinpath("openapi.yaml")),
    "simulator": gateway.simulator.__file__,
}))
"""


def build_context_copy(destination: Path) -> Path:
    """Copy what the Dockerfile's build stage copies, as `docker build` would send it."""
    destination.mkdir()
    for arguments in dockerfile("COPY"):
        if arguments.startswith("--from"):
            continue
        for source in arguments.split()[:-1]:
            path = REPO / source.rstrip("/")
            if path.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(path, destination / path.name, symlinks=True, ignore=ignore)
            else:
                shutil.copy2(path, destination / path.name)
    return destination


def test_the_wheel_installs_into_a_fresh_venv_with_its_package_data(tmp_path: Path) -> None:
    """The image's install steps: a new venv, the lock file, the wheel, pip check (needs PyPI)."""
    source = build_context_copy(tmp_path / "context")
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"
    for step in (
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "install", "--no-deps", "--require-hashes", "-r", str(source / "requirements.lock")],
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
    ):
        result = run(step, cwd=tmp_path)
        assert result.returncode == 0, output(result)
    [wheel] = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        # gateway/openapi.yaml is a symlink in the repository: the wheel must hold the file.
        assert archive.read("gateway/openapi.yaml") == (REPO / "openapi.yaml").read_bytes()
        assert "gateway/wsdl/um.wsdl" in archive.namelist()

    for step in (
        [*pip, "install", "--no-deps", str(wheel)],
        [python, "-m", "pip", "check"],
        [python, "-m", "pip", "uninstall", "--yes", "pip", "setuptools"],
    ):
        result = run(step, cwd=tmp_path)
        assert result.returncode == 0, output(result)

    help_text = run([str(venv / "bin" / "ews-gateway"), "--help"], cwd=tmp_path)
    assert help_text.returncode == 0, output(help_text)
    assert "serve" in help_text.stdout
    inspected = run([python, "-c", INSPECT_INSTALLED], cwd=tmp_path)
    assert inspected.returncode == 0, output(inspected)
    installed = json.loads(inspected.stdout)
    assert Path(installed["package"]).is_relative_to(venv)
    assert Path(installed["wsdl"]).is_file()
    openapi = Path(installed["openapi"])
    assert not openapi.is_symlink()
    assert openapi.read_bytes() == (REPO / "openapi.yaml").read_bytes()
    assert Path(installed["simulator"]).is_relative_to(venv)


# --- Kubernetes --------------------------------------------------------------------------


def test_every_file_of_the_kubernetes_folders_belongs_to_a_variant() -> None:
    on_disk = {
        path.resolve()
        for root in (KUBERNETES, KUBERNETES_VARIANTS)
        for pattern in ("*.yaml", "*.yml")
        for path in root.rglob(pattern)
    }
    used = {path for directory in VARIANTS.values() for path in kustomization_files(directory)}
    assert sorted(on_disk) == sorted(used)


def test_each_variant_is_the_default_with_one_component_of_its_name() -> None:
    """Components compose: a variant adds one to the default, and its own folder adds nothing."""
    components = {path.name for path in (KUBERNETES / "components").iterdir()}
    assert [Path(entry).name for entry in kustomization()["components"]] == ["redis"]
    assert set(VARIANTS) - {"default"} == components - {"redis"}
    for name, directory in VARIANTS.items():
        if name == "default":
            continue
        data = kustomization(directory)
        assert [(directory / entry).resolve() for entry in data["resources"]] == [KUBERNETES]
        [component] = [(directory / entry).resolve() for entry in data["components"]]
        assert component == KUBERNETES / "components" / name
        assert kustomization(component)["kind"] == "Component"
        assert data.keys() <= {"apiVersion", "kind", "resources", "components"}


@pytest.mark.parametrize("kubernetes", [OLDEST_KUBERNETES, "newest"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_fits_the_kubernetes_schema(variant: str, kubernetes: str) -> None:
    try:
        validator = importlib.import_module("kubernetes_validate")
    except ImportError:
        missing_tool("kubernetes-validate")
    known = schema_versions(validator)
    version = known[-1] if kubernetes == "newest" else kubernetes
    assert version in known, (
        f"kubernetes-validate has no {version} schemas: raise OLDEST_KUBERNETES"
    )
    failures = []
    for document in rendered(variant):
        if document["kind"] in CUSTOM_KINDS:
            continue
        try:
            validator.validate(document, version, strict=True)
        except validator.ValidationError as error:
            where = f"{document['kind']} {document['metadata']['name']} at {error.json_path}"
            failures.append(f"{where}: {error.message}")
    assert not failures, "\n".join(failures)


def test_the_default_variant_is_the_gateway_with_its_redis() -> None:
    names = sorted((doc["kind"], doc["metadata"]["name"]) for doc in rendered("default"))
    gateway = [(doc["kind"], doc["metadata"]["name"]) for doc in manifests()]
    redis = [(kind, "ews-gateway-redis") for kind in REDIS_KINDS]
    assert names == sorted(gateway + redis)
    assert all(
        doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ews-call-gateway"
        for doc in rendered("default")
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_gateway_container_runs_the_released_image(variant: str) -> None:
    spec = pod_template(rendered(variant))["spec"]
    [override] = kustomization()["images"]
    images = {c["image"] for c in spec["containers"] + spec.get("initContainers", [])}
    assert images == {f"{override['newName']}:{override['newTag']}"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_scrapes_the_gateway_exactly_once(variant: str) -> None:
    """The default uses the pods' annotations; the service-monitor variant only its monitor."""
    [mechanism] = scrape_mechanisms(rendered(variant))
    if variant == "service-monitor":
        assert mechanism == "ServiceMonitor ews-gateway"
    else:
        assert mechanism == "annotations of Deployment ews-gateway"


def test_the_service_monitor_scrapes_the_services_metrics_port() -> None:
    documents = rendered("service-monitor")
    monitor = only(documents, "ServiceMonitor")
    service = only(documents, "Service", "ews-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gateways_redis_url_names_the_redis_of_its_variant(variant: str) -> None:
    documents = rendered(variant)
    url = urlsplit(configmap_data(documents)["GATEWAY_REDIS_URL"])
    in_cluster = [doc for doc in documents if doc["metadata"]["name"] == "ews-gateway-redis"]
    if variant == "managed-redis":
        assert url.scheme == "rediss"
        assert [doc["kind"] for doc in in_cluster] == ["Secret"]
        return
    assert url.scheme == "redis"
    service = only(documents, "Service", url.hostname)
    [port] = [port for port in service["spec"]["ports"] if port["port"] == url.port]
    [name] = selected_pods(documents, service["spec"]["selector"])
    [redis] = deployments(documents)[name]["spec"]["template"]["spec"]["containers"]
    [container_port] = [p for p in redis["ports"] if p["name"] == port["targetPort"]]
    assert f"--port {container_port['containerPort']}" in redis["args"][0]


def test_redis_and_the_gateway_read_one_password_secret() -> None:
    documents = rendered("default")
    template = deployments(documents)["ews-gateway-redis"]["spec"]["template"]
    [redis] = template["spec"]["containers"]
    [password] = [item for item in redis["env"] if item["name"] == "REDISCLI_AUTH"]
    reference = password["valueFrom"]["secretKeyRef"]
    assert "requirepass $REDISCLI_AUTH" in redis["args"][0]
    password_file = configmap_data(documents)["GATEWAY_REDIS_PASSWORD_FILE"]
    source = file_source(pod_template(documents), gateway_container(documents), password_file)
    assert source == ("Secret", reference["name"], reference["key"])
    assert reference["key"] in only(documents, "Secret", reference["name"])["stringData"]


def test_redis_keeps_its_append_only_file_on_a_claimed_volume() -> None:
    documents = rendered("default")
    redis_deployment = deployments(documents)["ews-gateway-redis"]
    assert redis_deployment["spec"]["replicas"] == 1
    # One writer of the append-only file at a time, also during a rollout.
    assert redis_deployment["spec"]["strategy"]["type"] == "Recreate"
    spec = redis_deployment["spec"]["template"]["spec"]
    [redis] = spec["containers"]
    arguments = redis["args"][0]
    assert "--appendonly yes" in arguments
    data_dir = re.search(r"--dir (\S+)", arguments)
    assert data_dir is not None
    [mount] = [m for m in redis["volumeMounts"] if m["mountPath"] == data_dir[1]]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    claim = only(documents, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_only_the_gateways_pods_may_reach_redis() -> None:
    documents = rendered("default")
    policy = only(documents, "NetworkPolicy")
    assert selected_pods(documents, policy["spec"]["podSelector"]["matchLabels"]) == [
        "ews-gateway-redis"
    ]
    [rule] = policy["spec"]["ingress"]
    [source] = rule["from"]
    assert selected_pods(documents, source["podSelector"]["matchLabels"]) == ["ews-gateway"]


def test_the_managed_redis_ca_is_mounted_where_the_bundle_variable_points() -> None:
    documents = rendered("managed-redis")
    bundle = configmap_data(documents)["GATEWAY_REDIS_CA_BUNDLE"]
    source = file_source(pod_template(documents), gateway_container(documents), bundle)
    assert source == ("ConfigMap", "ews-gateway-redis-ca", "ca.pem")
    volumes = pod_template(documents)["spec"]["volumes"]
    [volume] = [v for v in volumes if v.get("configMap", {}).get("name") == source[1]]
    # Without the CA the gateway could not reach Redis: the pod waits for it instead.
    assert not volume["configMap"].get("optional")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_runs_unprivileged_within_limits(variant: str) -> None:
    for name, deployment in deployments(rendered(variant)).items():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert security["capabilities"]["drop"] == ["ALL"], container["name"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][kind].keys(), container["name"]


def test_the_exchange_check_runs_with_the_gateways_image_settings_and_files() -> None:
    documents = rendered("exchange-check")
    [check] = pod_template(documents)["spec"]["initContainers"]
    gateway = gateway_container(documents)
    assert check["args"] == ["check"]
    for field in ("image", "envFrom", "volumeMounts", "securityContext"):
        assert check[field] == gateway[field], field


def test_the_exchange_check_combined_with_a_managed_redis_mounts_its_ca(tmp_path: Path) -> None:
    """Listed after managed-redis, the check copies the mounts that component added."""
    base = os.path.relpath(KUBERNETES, tmp_path)
    combined = {
        "resources": [base],
        "components": [f"{base}/components/managed-redis", f"{base}/components/exchange-check"],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(combined), encoding="utf-8")
    documents = yaml_documents(kustomize_output(tmp_path))
    [check] = pod_template(documents)["spec"]["initContainers"]
    bundle = configmap_data(documents)["GATEWAY_REDIS_CA_BUNDLE"]
    assert file_source(pod_template(documents), check, bundle)[1] == "ews-gateway-redis-ca"
    assert check["volumeMounts"] == gateway_container(documents)["volumeMounts"]


def test_service_autoscaler_and_disruption_budget_select_the_gateway_pods() -> None:
    deployment = manifest("Deployment")
    pod_labels = pod_template()["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert manifest("Service")["spec"]["selector"].items() <= pod_labels
    assert manifest("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels
    target = manifest("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert manifest("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    # The autoscaler owns the replica count; an apply must not reset it.
    assert "replicas" not in deployment["spec"]


def test_no_gateway_selector_matches_the_redis_pods() -> None:
    documents = rendered("default")
    for kind in ("Service", "PodDisruptionBudget"):
        spec = only(documents, kind, "ews-gateway")["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selected_pods(documents, selector) == ["ews-gateway"], kind


def test_the_service_and_scrape_annotations_use_the_served_port() -> None:
    [port] = gateway_container()["ports"]
    [service_port] = manifest("Service")["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    bind_port = configmap_data()["GATEWAY_BIND"].rsplit(":", 1)[1]
    assert int(bind_port) == port["containerPort"]
    annotations = pod_template()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == bind_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_probes_ask_readyz_for_traffic_and_livez_for_life() -> None:
    container = gateway_container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"


def test_the_grace_period_outlasts_the_prestop_pause_and_the_gateway_drain() -> None:
    config = Config(
        ews_url="https://mail.example.com/EWS/Exchange.asmx",
        gateway_auth="none",
        ews_timeout_s=float(configmap_data()["EWS_TIMEOUT_SECONDS"]),
    )
    drain_s = gunicorn_options(config)["graceful_timeout"]
    command = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    assert pre_stop_s >= 5
    assert pod_template()["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + drain_s


def test_the_pod_runs_unprivileged_on_a_read_only_root() -> None:
    pod_security = pod_template()["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] > 0
    security = gateway_container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_metric_files_and_tmp_live_in_memory_volumes() -> None:
    """`serve` deletes and recreates PROMETHEUS_MULTIPROC_DIR, so it cannot be a mount point."""
    volumes = {volume["name"]: volume for volume in pod_template()["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in gateway_container()["volumeMounts"]}
    metrics_dir = Path(container_env()["PROMETHEUS_MULTIPROC_DIR"])
    [holder] = [path for path in mounts if metrics_dir.is_relative_to(path)]
    assert metrics_dir != Path(holder)
    assert mounts[holder]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in mounts["/tmp"]


def test_the_embedded_store_lives_on_a_disk_volume_of_its_own() -> None:
    """Without Redis, a day of idempotency keys may outgrow the memory-backed volumes."""
    volumes = {volume["name"]: volume for volume in pod_template()["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in gateway_container()["volumeMounts"]}
    state = mounts[container_env()["GATEWAY_STATE_DIR"]]
    assert "medium" not in state["emptyDir"]
    assert state["emptyDir"]["sizeLimit"]


def test_the_pod_has_resources_for_the_workers_it_sets() -> None:
    """Inside a container the default worker count follows the node's cores, not the limit."""
    resources = gateway_container()["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[kind].keys()
    assert int(configmap_data()["GATEWAY_WORKERS"]) >= 2


def test_envfrom_names_the_configmap_and_the_credentials_secret() -> None:
    sources = gateway_container()["envFrom"]
    assert {"configMapRef": {"name": "ews-gateway"}} in sources
    assert {"secretRef": {"name": "ews-gateway-credentials"}} in sources


def example_environment(root: Path, documents: list[dict[str, Any]]) -> dict[str, str]:
    """The gateway container's environment, its Secret and ConfigMap volumes written under ROOT."""
    environment = {**configmap_data(documents), **container_env(documents)}
    for source in gateway_container(documents)["envFrom"]:
        if "secretRef" in source:
            secret = only(documents, "Secret", source["secretRef"]["name"])
            environment.update(secret["stringData"])
    volumes = {volume["name"]: volume for volume in pod_template(documents)["spec"]["volumes"]}
    mounted: dict[str, Path] = {}
    for mount in gateway_container(documents)["volumeMounts"]:
        volume = volumes[mount["name"]]
        kind, key = ("Secret", "secretName") if "secret" in volume else ("ConfigMap", "name")
        spec = volume.get("secret") or volume.get("configMap")
        if spec is not None and spec.get("optional"):
            continue  # a source the example leaves to the operator
        directory = root / mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True)
        if spec is not None:  # else an emptyDir: empty, as the pod starts
            if (kind, spec[key]) in OPERATOR_CREATED:
                files = OPERATOR_CREATED[kind, spec[key]]
            else:
                resource = only(documents, kind, spec[key])
                files = resource.get("stringData") or resource.get("data") or {}
            for name, content in files.items():
                (directory / name).write_text(content, encoding="utf-8")
        mounted[mount["mountPath"]] = directory
    # Each path the pod would see is rewritten once, by the deepest mount that holds it.
    for variable, value in environment.items():
        holders = [path for path in mounted if value == path or value.startswith(path + "/")]
        if holders:
            path = max(holders, key=len)
            environment[variable] = str(mounted[path]) + value[len(path) :]
    return environment


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variants_configuration_is_one_the_gateway_accepts(
    variant: str, tmp_path: Path
) -> None:
    documents = rendered(variant)
    environment = example_environment(tmp_path, documents)
    # The example's call-id key is a published placeholder: refused until it is replaced.
    with pytest.raises(ConfigError, match=r"^GATEWAY_CALL_ID_KEY is the example placeholder"):
        Config.from_env(environment)
    config = Config.from_env({**environment, "GATEWAY_CALL_ID_KEY": secrets.token_urlsafe(48)})
    caller_authenticator(config)
    assert config.workers == int(configmap_data(documents)["GATEWAY_WORKERS"])
    assert config.redis_url == configmap_data(documents)["GATEWAY_REDIS_URL"]
    password = only(documents, "Secret", "ews-gateway-redis")["stringData"]["password"]
    assert config.redis_password == password


def test_the_examples_mention_every_documented_variable() -> None:
    """Set, or described in a comment next to the values, for every configuration variable."""
    text = "".join(
        (KUBERNETES / name).read_text(encoding="utf-8")
        for name in ("configmap.yaml", "secret.yaml", "deployment.yaml")
    )
    missing = {name for name in documented_variables() if not re.search(rf"\b{name}\b", text)}
    assert not missing


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_sets_only_documented_variables(variant: str) -> None:
    documents = rendered(variant)
    known = documented_variables() | {f"{name}_FILE" for name in documented_variables()}
    credentials = only(documents, "Secret", "ews-gateway-credentials")["stringData"]
    names = configmap_data(documents).keys() | credentials.keys() | container_env(documents).keys()
    assert not names - known


# --- Prometheus rules --------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = run([require_tool("promtool"), "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, output(result)


def test_promtool_rule_tests_pass() -> None:
    result = run([require_tool("promtool"), "test", "rules", *map(str, RULE_TESTS)], PROMETHEUS)
    assert result.returncode == 0, output(result)


def test_every_alert_has_a_firing_and_a_quiet_rule_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {alert["alert"] for alert in alerts()}
    assert not names - firing, "alerts never tested firing"
    assert not names - quiet, "alerts never tested quiet"


def test_every_alert_says_what_why_and_where_its_runbook_is() -> None:
    headings = set(re.findall(r"^## (\w+)$", RUNBOOK.read_text(encoding="utf-8"), re.MULTILINE))
    for alert in alerts():
        annotations = alert["annotations"]
        assert annotations["summary"]
        assert annotations["description"]
        assert annotations["runbook"] == f"deploy/prometheus/RUNBOOK.md#{alert['alert'].lower()}"
        assert alert["alert"] in headings
        assert alert["labels"]["severity"] in ("critical", "warning")


def test_throttling_is_exactly_the_codes_the_gateway_answers_503_retry_after() -> None:
    busy = {code for code, error in ERROR_BY_RESPONSE_CODE.items() if error is ExchangeBusy}
    for query in [rule["expr"] for rule in rules()] + dashboard_queries():
        for alternatives in re.findall(r'code=~"([^"]+)"', query):
            codes = set(alternatives.split("|"))
            assert codes == busy
            # Only known codes keep their name in the metric; others become "Other".
            assert {metric_code(code) for code in codes} == codes


def test_rules_and_dashboard_query_only_the_contracts_metrics() -> None:
    allowed = contract_series() | SCRAPE_SERIES | recorded_series()
    for query in all_queries():
        unknown = queried_series(query) - allowed
        assert not unknown, f"{sorted(unknown)} in {query}"


# --- Grafana dashboard -------------------------------------------------------------------


def test_the_dashboard_is_importable_json() -> None:
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    assert all(panel["targets"] for panel in dashboard_panels() if panel["type"] != "row")


def test_every_dashboard_variable_used_is_defined() -> None:
    defined = {variable["name"] for variable in dashboard()["templating"]["list"]}
    used = {name for query in all_queries() for name in _VARIABLE.findall(query)}
    assert used - {"__rate_interval"} <= defined
    assert used <= DASHBOARD_SAMPLES.keys()


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    queries = [
        _VARIABLE.sub(lambda match: DASHBOARD_SAMPLES[match[1]], query)
        for query in dashboard_queries()
    ]
    rules_file = tmp_path / "dashboard.rules.yaml"
    records = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    rules_file.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = run([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, output(result)


# --- against a real scrape ---------------------------------------------------------------


@pytest.mark.network
def test_every_metric_queried_is_in_a_real_scrape(tmp_path: Path) -> None:
    """Serve against the simulator, use every route once, and scrape what Prometheus would."""
    simulator_port, gateway_port = free_port(), free_port()
    simulator = start(
        ["simulator", "--bind", f"127.0.0.1:{simulator_port}"],
        {},
        f"http://127.0.0.1:{simulator_port}",
        "/simulator/health",
        tmp_path / "simulator.log",
    )
    try:
        gateway = start(
            ["serve"],
            gateway_env(simulator, gateway_port),
            f"http://127.0.0.1:{gateway_port}",
            "/readyz",
            tmp_path / "gateway.log",
        )
        try:
            base = gateway.url
            placed = http("POST", f"{base}/calls", {"itemId": "AAMkX", "dialString": "+15551234"})
            assert placed.status == 201, placed.body
            call = f"{base}/calls/{quote(placed.json()['callId'], safe='')}"
            assert http("GET", call).status == 200
            assert http("DELETE", call).status == 200
            for path in ("/livez", "/readyz", "/openapi.yaml"):
                assert http("GET", base + path).status == 200
            scrape = http("GET", f"{base}/metrics")
        finally:
            gateway.stop()
    finally:
        simulator.stop()

    assert scrape.status == 200
    samples = [
        sample
        for family in text_string_to_metric_families(scrape.body.decode())
        for sample in family.samples
    ]
    scraped = {sample.name for sample in samples}
    for query in all_queries():
        missing = {name for name in queried_series(query) if ":" not in name} - scraped
        assert not missing - SCRAPE_SERIES, f"{sorted(missing)} not scraped; query: {query}"
    routes = {sample.labels["route"] for sample in samples if "route" in sample.labels}
    assert {route for route in routes if re.fullmatch("/calls.*", route)} == {
        "/calls",
        "/calls/<call_id>",
    }
