"""Offline checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml, k8s/.

No Docker engine or cluster is needed. The files are parsed and checked against the code they
deploy: setting names against ``Settings().describe()``, commands against the CLI parser, and the
worker's stop grace period against CRAWLFLEET_SHUTDOWN_GRACE as those same files set it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from crawlfleet.cli.main import build_parser
from crawlfleet.common.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
# Manifests in k8s/ that are applied by hand and so must stay out of kustomization.yaml.
NOT_IN_KUSTOMIZATION = {"seed-job.yaml"}

K8S_FILES = sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])
YAML_FILES = [COMPOSE, *K8S_FILES]
DEPLOY_FILES = [DOCKERFILE, *YAML_FILES]

ENV_NAME = re.compile(r"\bCRAWLFLEET_[A-Z0-9_]+\b")
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod", "CronJob"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------------
# What the code says
# ------------------------------------------------------------------------------------------------


@cache
def setting_names() -> frozenset[str]:
    return frozenset(row[0] for row in Settings().describe())


@cache
def subcommands() -> frozenset[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return frozenset(action.choices)
    raise AssertionError("crawlfleet's parser has no subcommands")


def check_crawlfleet_argv(argv: list[str], where: str) -> None:
    """``argv`` (what follows ``crawlfleet``) must be a subcommand the CLI accepts, with arguments
    it accepts."""
    assert argv, f"{where}: no crawlfleet subcommand"
    assert argv[0] in subcommands(), (
        f"{where}: {argv[0]!r} is not a crawlfleet subcommand (have {sorted(subcommands())})"
    )
    if argv[0] == "testweb":  # parsed by its own parser, see crawlfleet.cli.main.main
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `crawlfleet {shlex.join(argv)}` does not parse") from exc


def effective_settings(env: dict[str, Any], where: str) -> Settings:
    try:
        return Settings.from_env({k: str(v) for k, v in env.items()})
    except SettingsError as exc:
        raise AssertionError(f"{where}: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------------


@cache
def load_yaml(path: Path) -> tuple[Any, ...]:
    with path.open(encoding="utf-8") as handle:
        return tuple(doc for doc in yaml.safe_load_all(handle) if doc is not None)


@cache
def compose() -> dict[str, Any]:
    (doc,) = load_yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every document of every manifest in k8s/, seed-job.yaml included."""
    for path in K8S_FILES:
        if path.name == KUSTOMIZATION.name:
            continue
        for doc in load_yaml(path):
            assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"
            yield path, doc


@cache
def dockerfile_instructions() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends with a line continuation"
    return tuple(instructions)


def dockerfile_final_stage() -> list[tuple[str, str]]:
    instructions = list(dockerfile_instructions())
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return instructions[starts[-1]:]


def exec_form(arguments: str, where: str) -> list[str]:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        raise AssertionError(f"{where} must use the exec (JSON) form, got {arguments!r}") from None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), where
    return value


def dockerfile_default_cmd() -> list[str]:
    cmds = [args for keyword, args in dockerfile_final_stage() if keyword == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    return exec_form(cmds[-1], "Dockerfile CMD")


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_final_stage():
        if keyword != "ENV":
            continue
        parts = shlex.split(args)
        if parts and "=" not in parts[0]:  # legacy `ENV NAME value`
            env[parts[0]] = " ".join(parts[1:])
            continue
        for part in parts:
            name, _, value = part.partition("=")
            env[name] = value
    return env


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def env_pairs(node: Any) -> Iterator[tuple[str, Any]]:
    """Every CRAWLFLEET_* name and value set anywhere in a parsed YAML document: mapping keys
    (compose ``environment``, ConfigMap ``data``), ``{name, value}`` items (k8s ``env``) and
    ``NAME=value`` strings (compose's list form)."""
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and name.startswith("CRAWLFLEET_") and "value" in node:
            yield name, node["value"]
        for key, value in node.items():
            if isinstance(key, str) and key.startswith("CRAWLFLEET_") and not isinstance(
                value, dict | list
            ):
                yield key, value
            yield from env_pairs(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_pairs(item)
    elif isinstance(node, str):
        match = re.fullmatch(r"(CRAWLFLEET_[A-Z0-9_]+)=(.*)", node, re.DOTALL)
        if match:
            yield match.group(1), match.group(2)


# ------------------------------------------------------------------------------------------------
# Compose helpers
# ------------------------------------------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose().get("services")
    assert isinstance(services, dict) and services, "docker-compose.yml has no services"
    return services


def is_crawlfleet_image(image: str) -> bool:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[0] == "crawlfleet"


def compose_crawlfleet_argv(service: dict[str, Any]) -> list[str] | None:
    """What follows ``crawlfleet`` for a service running the project's image, else None."""
    if "build" not in service and not is_crawlfleet_image(str(service.get("image", ""))):
        return None
    entrypoint = as_argv(service.get("entrypoint"))
    command = as_argv(service.get("command")) if "command" in service else dockerfile_default_cmd()
    if entrypoint:
        assert Path(entrypoint[0]).name == "crawlfleet", f"entrypoint {entrypoint} is not ours"
        return entrypoint[1:] + command
    return command


def compose_env(service: dict[str, Any]) -> dict[str, Any]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.partition("=")[::2] for item in environment)
    return dict(environment)


def compose_services_running(subcommand: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, service in compose_services().items():
        argv = compose_crawlfleet_argv(service)
        if argv and argv[0] == subcommand:
            found.append((name, service))
    return found


def duration_seconds(value: Any) -> float:
    """A compose duration (``30s``, ``1m30s``, ``1500ms``) in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def redis_aof_flags(argv: list[str], where: str) -> None:
    def flag(name: str) -> str | None:
        for i, arg in enumerate(argv[:-1]):
            if arg == name:
                return argv[i + 1]
        return None

    assert argv[:1] == ["redis-server"], f"{where}: Redis must run redis-server, got {argv}"
    assert flag("--appendonly") == "yes", f"{where}: AOF is off ({shlex.join(argv)})"
    assert flag("--appendfsync") == "everysec", f"{where}: want --appendfsync everysec"


# ------------------------------------------------------------------------------------------------
# Kubernetes helpers
# ------------------------------------------------------------------------------------------------


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind not in POD_KINDS:
        return None
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def k8s_crawlfleet_argv(container: dict[str, Any]) -> list[str] | None:
    if not is_crawlfleet_image(str(container.get("image", ""))):
        return None
    command = as_argv(container.get("command"))
    args = as_argv(container.get("args")) if "args" in container else None
    if command:
        assert Path(command[0]).name == "crawlfleet", f"command {command} is not crawlfleet"
        return command[1:] + (args or [])
    return args if args is not None else dockerfile_default_cmd()


def k8s_workloads_running(subcommand: str) -> list[tuple[Path, dict[str, Any], dict[str, Any]]]:
    """(file, workload, container) for every container whose crawlfleet subcommand matches."""
    found = []
    for path, doc in k8s_docs():
        spec = pod_spec(doc)
        for container in containers(spec) if spec else []:
            argv = k8s_crawlfleet_argv(container)
            if argv and argv[0] == subcommand:
                found.append((path, doc, container))
    return found


def config_maps() -> dict[tuple[str | None, str], dict[str, Any]]:
    return {
        (doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc.get("data") or {}
        for _, doc in k8s_docs()
        if doc.get("kind") == "ConfigMap"
    }


def k8s_container_env(doc: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's CRAWLFLEET_* environment as Kubernetes builds it: envFrom ConfigMaps in
    order, then ``env`` (which wins). Literal values only."""
    namespace = doc["metadata"].get("namespace")
    maps = config_maps()
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref is None:
            continue
        key = (namespace, ref["name"])
        assert key in maps, f"{doc['metadata']['name']}: envFrom ConfigMap {ref['name']} not found"
        prefix = source.get("prefix", "")
        env.update({prefix + k: v for k, v in maps[key].items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return {k: v for k, v in env.items() if k.startswith("CRAWLFLEET_")}


# ------------------------------------------------------------------------------------------------
# Settings named in the files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=rel)
def test_every_crawlfleet_variable_is_a_setting(path: Path) -> None:
    named = set(ENV_NAME.findall(path.read_text(encoding="utf-8")))
    unknown = sorted(named - setting_names())
    assert not unknown, f"{rel(path)} names unknown settings {unknown}"


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_crawlfleet_value_parses(path: Path) -> None:
    for doc in load_yaml(path):
        for name, value in env_pairs(doc):
            if isinstance(value, str) and "${" in value:  # compose interpolation
                continue
            effective_settings({name: value}, f"{rel(path)}: {name}")


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=rel)
def test_allow_private_is_never_enabled(path: Path) -> None:
    values: list[Any] = []
    if path.suffix in (".yml", ".yaml"):
        values += [v for doc in load_yaml(path) for n, v in env_pairs(doc)
                   if n == "CRAWLFLEET_ALLOW_PRIVATE"]
    else:
        values += [v for n, v in dockerfile_env().items() if n == "CRAWLFLEET_ALLOW_PRIVATE"]
    # Also any textual assignment (comments included), whatever the syntax around it.
    text = path.read_text(encoding="utf-8")
    values += re.findall(r"CRAWLFLEET_ALLOW_PRIVATE[\"']?\s*[:=]\s*[\"']?([^\s\"'#]*)", text)
    for value in values:
        if isinstance(value, str) and "${" in value:
            pytest.fail(f"{rel(path)}: CRAWLFLEET_ALLOW_PRIVATE must not come from the outside")
        enabled = effective_settings(
            {"CRAWLFLEET_ALLOW_PRIVATE": value}, rel(path)
        ).allow_private
        assert not enabled, f"{rel(path)} enables CRAWLFLEET_ALLOW_PRIVATE ({value!r})"


def test_configmap_values_are_strings() -> None:
    for path, doc in k8s_docs():
        if doc.get("kind") == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                assert isinstance(value, str), (
                    f"{rel(path)}: ConfigMap {doc['metadata']['name']} {key} is {value!r}, "
                    "not a string (quote it)"
                )


# ------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ------------------------------------------------------------------------------------------------


def test_dockerfile_base_image_entrypoint_and_cmd() -> None:
    froms = [args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert froms[-1] == "python:3.11-slim", f"runtime stage is based on {froms[-1]}"
    stage = dockerfile_final_stage()
    entrypoints = [args for keyword, args in stage if keyword == "ENTRYPOINT"]
    assert entrypoints, "Dockerfile has no ENTRYPOINT"
    assert exec_form(entrypoints[-1], "ENTRYPOINT") == ["crawlfleet"]
    check_crawlfleet_argv(dockerfile_default_cmd(), "Dockerfile CMD")


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for keyword, args in dockerfile_final_stage() if keyword == "USER"]
    assert users, "the runtime stage has no USER: it would run as root"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"


def test_dockerfile_stop_signal_and_env() -> None:
    stage = dockerfile_final_stage()
    signals = [args for keyword, args in stage if keyword == "STOPSIGNAL"]
    assert signals and signals[-1] in ("SIGTERM", "15"), f"STOPSIGNAL is {signals}"
    env = dockerfile_env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("CRAWLFLEET_LOG_FORMAT") == "json"


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def dockerignored(path: str) -> bool:
    """Roughly Docker's rules: the last matching pattern wins, ``!`` re-includes, a pattern that
    matches a folder excludes what is inside it."""
    candidates = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    ignored = False
    for raw in dockerignore_patterns():
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        alternatives = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_local_state() -> None:
    for path in (".venv/bin/python", ".git/HEAD", ".pytest_cache/README.md",
                 "common/__pycache__/settings.cpython-311.pyc", ".mypy_cache/x"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = ["pyproject.toml"]
    if isinstance(pyproject["project"].get("readme"), str):
        needed.append(pyproject["project"]["readme"])
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"].values()
    needed += [f"{folder}/__init__.py" for folder in package_dirs]
    for path in needed:
        assert not dockerignored(path), f".dockerignore drops {path}, which `pip install .` needs"


# ------------------------------------------------------------------------------------------------
# docker-compose.yml
# ------------------------------------------------------------------------------------------------


def test_compose_has_no_version_key() -> None:
    assert "version" not in compose(), "the compose spec has no `version:`"


def test_compose_commands_are_crawlfleet_subcommands() -> None:
    checked = 0
    for name, service in compose_services().items():
        argv = compose_crawlfleet_argv(service)
        if argv is not None:
            check_crawlfleet_argv(argv, f"docker-compose.yml service {name}")
            checked += 1
    assert checked >= 3, "expected the scheduler, worker and seed services"


def test_compose_one_scheduler() -> None:
    schedulers = compose_services_running("scheduler")
    assert len(schedulers) == 1, f"want one scheduler service, got {[n for n, _ in schedulers]}"
    name, service = schedulers[0]
    replicas = (service.get("deploy") or {}).get("replicas", 1)
    assert replicas == 1, f"service {name}: scheduler replicas must be 1, got {replicas}"


def test_compose_worker_stop_grace_period_exceeds_shutdown_grace() -> None:
    workers = compose_services_running("worker")
    assert workers, "docker-compose.yml has no worker service"
    for name, service in workers:
        grace = effective_settings(compose_env(service), f"service {name}").shutdown_grace
        assert "stop_grace_period" in service, f"service {name} has no stop_grace_period"
        period = duration_seconds(service["stop_grace_period"])
        assert period > grace, (
            f"service {name}: stop_grace_period {period:g}s must exceed "
            f"CRAWLFLEET_SHUTDOWN_GRACE {grace:g}s, or Docker kills workers mid hand-back"
        )


def test_compose_redis_has_aof_volume_and_healthcheck() -> None:
    redis = [(n, s) for n, s in compose_services().items()
             if str(s.get("image", "")).split(":")[0].rsplit("/", 1)[-1] == "redis"]
    assert len(redis) == 1, "want one redis service"
    name, service = redis[0]
    redis_aof_flags(as_argv(service.get("command")), f"docker-compose.yml service {name}")
    mounts = [str(v).split(":")[1] for v in service.get("volumes", []) if isinstance(v, str)]
    assert "/data" in mounts, f"service {name}: /data (the AOF) is not on a volume"
    test = " ".join(as_argv(service.get("healthcheck", {}).get("test")))
    assert "redis-cli" in test and "ping" in test, f"service {name}: healthcheck is {test!r}"
    for other, dependent in compose_services().items():
        if compose_crawlfleet_argv(dependent) is not None:
            depends = dependent.get("depends_on") or {}
            assert isinstance(depends, dict), f"service {other}: depends_on needs conditions"
            condition = depends.get(name, {}).get("condition")
            assert condition == "service_healthy", f"service {other} must wait for {name} healthy"


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker binary")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                             timeout=60, check=False)
    if version.returncode != 0:
        reason = (version.stderr or version.stdout).strip().splitlines() or ["no output"]
        pytest.skip(f"`docker compose` unavailable: {reason[0]}")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--profile", "tools", "config", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------
# k8s/
# ------------------------------------------------------------------------------------------------


def test_k8s_commands_are_crawlfleet_subcommands() -> None:
    checked = 0
    for path, doc in k8s_docs():
        spec = pod_spec(doc)
        for container in containers(spec) if spec else []:
            argv = k8s_crawlfleet_argv(container)
            if argv is not None:
                where = f"{rel(path)}: {doc['kind']} {doc['metadata']['name']}/{container['name']}"
                check_crawlfleet_argv(argv, where)
                checked += 1
    assert checked >= 3, "expected the scheduler, worker and seed containers"


def test_k8s_one_scheduler_recreated() -> None:
    schedulers = k8s_workloads_running("scheduler")
    assert len(schedulers) == 1, "want exactly one scheduler workload"
    path, doc, _ = schedulers[0]
    assert doc["kind"] == "Deployment", f"{rel(path)}: the scheduler is a {doc['kind']}"
    assert doc["spec"].get("replicas") == 1, f"{rel(path)}: scheduler replicas must be 1"
    strategy = doc["spec"].get("strategy", {}).get("type")
    assert strategy == "Recreate", f"{rel(path)}: a rollout must not run two schedulers"


def test_k8s_worker_grace_period_exceeds_shutdown_grace() -> None:
    workers = k8s_workloads_running("worker")
    assert workers, "k8s/ has no worker"
    for path, doc, container in workers:
        where = f"{rel(path)}: {doc['metadata']['name']}"
        grace = effective_settings(k8s_container_env(doc, container), where).shutdown_grace
        spec = pod_spec(doc)
        assert spec is not None
        period = spec.get("terminationGracePeriodSeconds")
        assert period is not None, f"{where}: set terminationGracePeriodSeconds"
        assert period > grace, (
            f"{where}: terminationGracePeriodSeconds {period} must exceed "
            f"CRAWLFLEET_SHUTDOWN_GRACE {grace:g}, or the kubelet kills workers mid hand-back"
        )


def test_k8s_crawlfleet_containers_are_locked_down() -> None:
    for path, doc in k8s_docs():
        spec = pod_spec(doc)
        for container in containers(spec) if spec else []:
            if k8s_crawlfleet_argv(container) is None:
                continue
            where = f"{rel(path)}: {doc['metadata']['name']}/{container['name']}"
            pod_security = spec.get("securityContext", {})
            security = container.get("securityContext", {})
            non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            assert non_root is True, f"{where}: runAsNonRoot is not set"
            assert security.get("readOnlyRootFilesystem") is True, f"{where}: writable root fs"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: read-only root needs a /tmp volume"
            assert container.get("resources", {}).get("limits"), f"{where}: no resource limits"
            for item in container.get("envFrom", []):
                if "configMapRef" in item:
                    namespace = doc["metadata"].get("namespace")
                    assert (namespace, item["configMapRef"]["name"]) in config_maps(), where


def test_k8s_redis_statefulset_has_aof_storage_and_probe() -> None:
    found = []
    for path, doc in k8s_docs():
        spec = pod_spec(doc)
        for container in containers(spec) if spec else []:
            image = str(container.get("image", "")).split(":")[0].rsplit("/", 1)[-1]
            if image == "redis":
                found.append((path, doc, container))
    assert len(found) == 1, "want one Redis container"
    path, doc, container = found[0]
    where = f"{rel(path)}: {doc['kind']} {doc['metadata']['name']}"
    assert doc["kind"] == "StatefulSet", f"{where}: Redis must be a StatefulSet"
    assert doc["spec"].get("replicas") == 1, f"{where}: Redis replicas must be 1"
    redis_aof_flags(as_argv(container.get("command")) + as_argv(container.get("args")), where)
    claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
    data = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/data"]
    assert data and data[0]["name"] in claims, f"{where}: /data is not on a PVC template"
    probe = " ".join(as_argv(container.get("readinessProbe", {}).get("exec", {}).get("command")))
    assert "redis-cli" in probe and "ping" in probe, f"{where}: readiness probe is {probe!r}"
    service_name = doc["spec"].get("serviceName")
    services = [d for _, d in k8s_docs() if d.get("kind") == "Service"
                and d["metadata"]["name"] == service_name]
    assert services, f"{where}: no Service {service_name!r}"
    assert services[0]["spec"].get("clusterIP") == "None", f"Service {service_name} not headless"


def test_kustomization_lists_existing_files() -> None:
    (kustomization,) = load_yaml(KUSTOMIZATION)
    resources = kustomization.get("resources", [])
    assert resources, "kustomization.yaml lists no resources"
    for resource in resources:
        assert (K8S / resource).exists(), f"kustomization.yaml lists missing {resource}"
    listed = {Path(r).name for r in resources}
    manifests = {p.name for p in K8S_FILES} - {KUSTOMIZATION.name}
    assert not listed & NOT_IN_KUSTOMIZATION, "seed-job.yaml is applied by hand, not by -k"
    forgotten = sorted(manifests - listed - NOT_IN_KUSTOMIZATION)
    assert not forgotten, f"k8s/ manifests missing from kustomization.yaml: {forgotten}"


def test_k8s_manifests_have_kind_name_and_namespace() -> None:
    for path, doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), f"{rel(path)}: apiVersion/kind missing"
        metadata = doc.get("metadata") or {}
        assert metadata.get("name"), f"{rel(path)}: {doc['kind']} has no name"
        if doc["kind"] != "Namespace":
            assert metadata.get("namespace") == "crawlfleet", (
                f"{rel(path)}: {doc['kind']} {metadata['name']} is not in namespace crawlfleet"
            )


def test_kubectl_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl binary")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert {"Namespace", "ConfigMap", "StatefulSet", "Service", "Deployment"} <= kinds
