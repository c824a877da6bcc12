"""The deploy files start what they say (issue 16, "deploy that starts"), checked without
a cluster or a Docker daemon: every YAML parses; every Deployment's containers, as
kustomize renders each directory, have probes on the role's HTTP port, a writable
SVC_DATA_DIR on a read-only root, non-root, their role's NATS secret, a PDB and pod
anti-affinity; the image pins its base, declares a HEALTHCHECK a slim image can run, and
installs extras that resolve and import here."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from contracts.streams import DEADLETTER, INBOUND

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE_DIRS = sorted(p.parent.name for p in DEPLOY.glob("k8s*/kustomization.yaml"))
WORKLOADS = ("Deployment", "StatefulSet")
NATS_SECRET_ROLES = {"core", "whatsapp", "whatsapp-ingress", "whatsapp-egress", "web"}


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_under_deploy_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} holds no YAML document"
    for document in documents:
        assert isinstance(document, dict), f"{path}: a document is not a mapping"
        assert "apiVersion" in document, f"{path}: a document has no apiVersion"
        assert "kind" in document, f"{path}: a document has no kind"


def render(directory: str) -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/<directory>` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def env_of(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment as its ConfigMaps and `env` set it (secrets left out)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [d for d in docs if d["kind"] in WORKLOADS]
    assert found, "no Deployment rendered"
    return found


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS)
def test_every_container_has_probes_on_its_http_port(directory: str) -> None:
    docs = render(directory)
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        for container in workload["spec"]["template"]["spec"]["containers"]:
            env = env_of(container, docs)
            assert env.get("SVC_HTTP_HOST") == "0.0.0.0", f"{name}: kubelet probes the pod IP"
            port = int(env["SVC_HTTP_PORT"])
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                check = container.get(probe, {}).get("httpGet")
                assert check, f"{name}: no {probe}"
                assert check["path"] == path, f"{name}: {probe} on {check['path']}"
                target = check["port"]
                assert ports.get(target, target) == port, f"{name}: {probe} not on {port}"


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS)
def test_every_container_has_a_writable_data_dir_on_a_read_only_root(directory: str) -> None:
    docs = render(directory)
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        writable = {
            v["name"]
            for v in pod.get("volumes", [])
            if "emptyDir" in v or "persistentVolumeClaim" in v
        }
        writable |= {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        for container in pod["containers"]:
            data_dir = env_of(container, docs).get("SVC_DATA_DIR")
            assert data_dir, f"{name}: SVC_DATA_DIR is not set (the image's default is on /)"
            mounts = {
                m["mountPath"]: m
                for m in container.get("volumeMounts", [])
                if not m.get("readOnly")
            }
            assert data_dir in mounts, f"{name}: nothing writable is mounted at {data_dir}"
            assert mounts[data_dir]["name"] in writable, f"{name}: {data_dir} is not writable"
            security = container.get("securityContext", {})
            assert security.get("readOnlyRootFilesystem") is True, name
            assert security.get("allowPrivilegeEscalation") is False, name
            non_root = security.get(
                "runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot")
            )
            assert non_root is True, f"{name}: not runAsNonRoot"


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS)
def test_every_deployment_has_a_pdb_anti_affinity_and_a_tokenless_service_account(
    directory: str,
) -> None:
    docs = render(directory)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        template = workload["spec"]["template"]
        labels = template["metadata"]["labels"]
        pod = template["spec"]
        assert [b for b in budgets if selects(b["spec"]["selector"], labels)], f"{name}: no PDB"
        anti = pod.get("affinity", {}).get("podAntiAffinity", {})
        terms = [
            t.get("podAffinityTerm", t)
            for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
            + anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        ]
        assert [t for t in terms if selects(t["labelSelector"], labels)], (
            f"{name}: no anti-affinity"
        )
        account = pod.get("serviceAccountName")
        assert account in accounts, f"{name}: no ServiceAccount of its own"
        assert pod.get("automountServiceAccountToken") is False, name
        assert accounts[account].get("automountServiceAccountToken") is False


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS)
def test_every_role_logs_in_to_nats_with_its_own_secret(directory: str) -> None:
    docs = render(directory)
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            args = container["args"]
            assert args[0] == "run", args
            role = args[1]
            assert role in NATS_SECRET_ROLES
            secrets = {
                s["secretRef"]["name"]: s["secretRef"]
                for s in container.get("envFrom", [])
                if "secretRef" in s
            }
            ref = secrets.get(f"switchboard-nats-{role}")
            assert ref is not None, f"{workload['metadata']['name']}: no switchboard-nats-{role}"
            assert not ref.get("optional"), "a missing NATS secret must stop the pod starting"
            # exactly one NATS identity: no other role's secret rides along
            others = [s for s in secrets if s.startswith("switchboard-nats-")]
            assert others == [f"switchboard-nats-{role}"], others


def test_the_secret_examples_name_a_nats_user_per_role() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text()))
    nats = [d for d in documents if d["metadata"]["name"].startswith("switchboard-nats-")]
    assert nats
    for secret in nats:
        assert set(secret["stringData"]) == {"NATS_USER", "NATS_PASSWORD"}


# --- the container image, without building it -------------------------------------------

DOCKERFILE = DEPLOY / "container" / "Dockerfile"
# The module each extra's requirement makes importable (the one the code imports).
MODULES = {
    "openai": "openai",
    "opentelemetry-exporter-otlp-proto-http": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    ),
}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_image_pins_its_base_to_an_exact_release_and_fits_requires_python() -> None:
    (base,) = [arg for op, arg in instructions() if op == "FROM"]
    found = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base)
    assert found, f"FROM {base}: pin an exact Python release (x.y.z) or a digest"
    assert found.group(1) in SpecifierSet(pyproject()["project"]["requires-python"])


def test_the_extras_the_image_installs_resolve_and_import() -> None:
    (install,) = [arg for op, arg in instructions() if op == "RUN" and "pip install" in arg]
    extras = re.search(r"pip install \"?\.\[([a-z0-9_,-]+)\]\"?", install)
    assert extras, f"the image installs no extras: {install}"
    named = extras.group(1).split(",")
    assert {"openai", "otlp"} <= set(named)
    declared = pyproject()["project"]["optional-dependencies"]
    for extra in named:
        assert extra in declared, f"the image installs extra {extra!r}, pyproject has none"
        for line in declared[extra]:
            requirement = Requirement(line)
            installed = importlib.metadata.version(requirement.name)
            assert requirement.specifier.contains(installed, prereleases=True), (
                f"{requirement.name} {installed} does not satisfy {line}"
            )
            assert requirement.name in MODULES, f"say which module {requirement.name} provides"
            importlib.import_module(MODULES[requirement.name])


def test_the_image_declares_a_healthcheck_a_slim_image_can_run_on_its_http_port() -> None:
    found = instructions()
    (check,) = [arg for op, arg in found if op == "HEALTHCHECK"]
    assert "/healthz" in check
    assert "python" in check
    assert not re.search(r"\b(curl|wget)\b", check), "python:*-slim has neither curl nor wget"
    env = " ".join(arg for op, arg in found if op == "ENV")
    port = re.search(r"SVC_HTTP_PORT=(\d+)", env)
    assert port, "the image sets no SVC_HTTP_PORT: no HTTP server to check"
    assert f"'{port.group(1)}'" in check, "the check's default port is not the image's"
    assert ("EXPOSE", port.group(1)) in found
    assert re.search(r"SVC_HTTP_HOST=0\.0\.0\.0", env), "probes from outside need 0.0.0.0"
    for source in [arg.split()[0] for op, arg in found if op == "COPY"]:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"


# --- what the docs and configs say agrees with the code ---------------------------------


def test_the_deploy_readme_states_the_message_limits_the_code_has() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert f"{INBOUND.max_msg_size // 1024} KiB per message" in readme
    assert f"{DEADLETTER.max_msg_size // (1024 * 1024)} MiB per dead letter" in readme
    # and the shipped servers accept a dead letter of that size
    for conf in sorted((DEPLOY / "nats").glob("*.conf")):
        found = re.search(r"^\s*max_payload:\s*(\d+)\s*MB", conf.read_text(), re.M)
        size = int(found.group(1)) * 1024 * 1024 if found else 1024 * 1024
        assert size >= DEADLETTER.max_msg_size, f"{conf.name}: max_payload below a dead letter"


def test_no_deploy_doc_calls_a_second_core_a_standby_or_openai_unsupported() -> None:
    for path in [DEPLOY / "README.md", *sorted(DEPLOY.rglob("*.yaml")), *DEPLOY.rglob("*.example")]:
        text = path.read_text().lower()
        assert "hot standby" not in text, path
        assert "max_ack_pending=1" not in text, path
        assert not re.search(r"openai[^\n]*(refused|not supported|unsupported)", text), path


def test_the_systemd_unit_reads_a_per_role_environment_file() -> None:
    unit = (DEPLOY / "systemd" / "switchboard@.service").read_text()
    assert "EnvironmentFile=-/etc/switchboard/%i.env" in unit
    example = (DEPLOY / "systemd" / "role.env.example").read_text()
    keys = {
        line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")
    }
    assert {"NATS_USER", "NATS_PASSWORD", "SVC_HTTP_PORT"} <= keys
