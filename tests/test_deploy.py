"""Offline checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml,
.env.example, k8s/ (the base, k8s/seed and every overlay), and the probe command they run.

No Docker engine or cluster is needed. Every kustomization is rendered (tests/deploy_files.py,
compared with ``kubectl kustomize`` where kubectl is installed) and every object validated
against the Kubernetes schemas of KUBERNETES_VERSION (kubernetes-validate, strict: unknown fields
fail), the KEDA ScaledObject against tests/schemas/keda-scaledobject.json, docker-compose.yml
against the Compose Specification's schema (as check-jsonschema ships it). The files are also
checked against the code they deploy: setting names against ``Settings().describe()``, commands
against the CLI parser, grace periods against CRAWLFLEET_SHUTDOWN_GRACE as those files set it.
tests/integration/test_deploy_run.py runs what they run.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import importlib
import importlib.resources
import json
import math
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from crawlfleet.cli import health as health_command
from crawlfleet.cli.main import build_parser, main
from crawlfleet.common.connections import open_redis
from crawlfleet.common.keys import Keys
from crawlfleet.common.settings import Settings, SettingsError
from crawlfleet.testweb.cli import build_parser as build_web_parser

from . import deploy_files as files
from .deploy_files import (
    COMPOSE,
    ENV_EXAMPLE,
    K8S,
    KUSTOMIZATIONS,
    ROOT,
    as_argv,
    containers,
    crawlfleet_containers,
    example_secrets,
    pod_spec,
    rendered,
    split_image,
)

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KEDA_SCHEMA = ROOT / "tests" / "schemas" / "keda-scaledobject.json"
# The oldest Kubernetes the manifests promise to work on; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.30.0"
IMAGE = "crawlfleet"
DEMO_PROFILE = "demo"

K8S_FILES = sorted(K8S.rglob("*.yaml"))
YAML_FILES = [COMPOSE, *K8S_FILES]
DEPLOY_FILES = [DOCKERFILE, ENV_EXAMPLE, *YAML_FILES]

# The kustomizations that run `crawlfleet seed` (a Job, applied after a fleet), each with the
# kustomization whose ConfigMap it reads; the others run a fleet.
SEED_OF = {"seed": "base", "overlays/sharded/seed": "overlays/sharded"}
FLEETS = [n for n in KUSTOMIZATIONS if n not in SEED_OF]
# Redis shards (CRAWLFLEET_REDIS_URLS entries, Redis pods) where there are several.
SHARDS = {"overlays/sharded": 3, "overlays/sharded/seed": 3}

ENV_NAME = re.compile(r"\bCRAWLFLEET_[A-Z0-9_]+\b")
# Private, shared and link-local IPv4 ranges the workers' egress must leave out.
PRIVATE_RANGES = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                  "100.64.0.0/10"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def shards(name: str) -> int:
    return SHARDS.get(name, 1)


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


@cache
def project_version() -> str:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return str(pyproject["project"]["version"])


def check_crawlfleet_argv(argv: list[str], where: str) -> None:
    """``argv`` (what follows ``crawlfleet``) must be a subcommand the CLI accepts, with arguments
    it accepts."""
    assert argv, f"{where}: no crawlfleet subcommand"
    assert argv[0] in subcommands(), (
        f"{where}: {argv[0]!r} is not a crawlfleet subcommand (have {sorted(subcommands())})"
    )
    parser = build_web_parser() if argv[0] == "testweb" else build_parser()
    try:
        parser.parse_args(argv[1:] if argv[0] == "testweb" else argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `crawlfleet {shlex.join(argv)}` does not parse") from exc


def effective_settings(env: dict[str, Any], where: str) -> Settings:
    try:
        return Settings.from_env({k: str(v) for k, v in env.items()
                                  if k.startswith("CRAWLFLEET_")})
    except SettingsError as exc:
        raise AssertionError(f"{where}: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------------


@cache
def load_yaml(path: Path) -> tuple[Any, ...]:
    return tuple(files.load_docs(path))


@cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(rendered(name))


@cache
def compose() -> dict[str, Any]:
    """docker-compose.yml as compose reads it, with .env.example as .env."""
    return files.compose()


def all_rendered() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in KUSTOMIZATIONS:
        for obj in render(name):
            yield name, obj


def where_of(name: str, obj: dict[str, Any], container: dict[str, Any] | None = None) -> str:
    suffix = f"/{container['name']}" if container else ""
    return f"k8s/{name}: {obj['kind']} {obj['metadata']['name']}{suffix}"


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


# Memory units, by who reads them: Kubernetes quantities (Ki..Ti binary, k..T decimal), compose's
# (docker's go-units: binary whatever the case, an optional b), Redis's (kb/mb/gb binary, k/m/g
# decimal).
UNITS = {
    "k8s": {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12},
    "compose": {"": 1, **{u + b: 1 << (10 * (i + 1)) for i, u in enumerate("kmgt")
                          for b in ("", "b")}},
    "redis": {"": 1, "k": 10**3, "kb": 1 << 10, "m": 10**6, "mb": 1 << 20, "g": 10**9,
              "gb": 1 << 30},
}


def memory_bytes(quantity: Any, reader: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity).strip())
    assert match, f"bad memory quantity {quantity!r}"
    unit = match.group(2).lower() if reader != "k8s" else match.group(2)
    assert unit in UNITS[reader], f"{quantity!r} has no unit {reader} knows"
    return int(float(match.group(1)) * UNITS[reader][unit])


# ------------------------------------------------------------------------------------------------
# Compose helpers
# ------------------------------------------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose().get("services")
    assert isinstance(services, dict) and services, "docker-compose.yml has no services"
    return services


def is_crawlfleet_image(image: str) -> bool:
    return split_image(image)[0].rsplit("/", 1)[-1] == IMAGE


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


def compose_services_running(subcommand: str, *, profile: str | None = None
                             ) -> list[tuple[str, dict[str, Any]]]:
    """Services running ``subcommand``; with ``profile`` None, those started by a plain
    ``docker compose up`` (no profile)."""
    found = []
    for name, service in compose_services().items():
        argv = compose_crawlfleet_argv(service)
        profiles = service.get("profiles") or []
        in_profile = not profiles if profile is None else profile in profiles
        if argv and argv[0] == subcommand and in_profile:
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


def flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def check_redis_flags(argv: list[str], where: str, password: str, limit: int) -> None:
    assert argv[:1] == ["redis-server"], f"{where}: Redis must run redis-server, got {argv}"
    assert flag(argv, "--appendonly") == "yes", f"{where}: AOF is off ({shlex.join(argv)})"
    assert flag(argv, "--appendfsync") == "everysec", f"{where}: want --appendfsync everysec"
    assert flag(argv, "--maxmemory-policy") == "noeviction", (
        f"{where}: the frontier must never be evicted: want --maxmemory-policy noeviction")
    assert flag(argv, "--requirepass") == password, f"{where}: --requirepass is not the password"
    maxmemory = flag(argv, "--maxmemory")
    assert maxmemory, f"{where}: no --maxmemory: Redis would grow into its memory limit"
    assert memory_bytes(maxmemory, "redis") <= 0.75 * limit, (
        f"{where}: maxmemory {maxmemory} leaves too little of the {limit} B limit for the fork "
        "of an AOF rewrite (keep it at most 75%)")


# ------------------------------------------------------------------------------------------------
# Settings named in the files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=rel)
def test_every_crawlfleet_variable_is_a_setting(path: Path) -> None:
    named = set(ENV_NAME.findall(path.read_text(encoding="utf-8")))
    unknown = sorted(named - setting_names())
    assert not unknown, f"{rel(path)} names unknown settings {unknown}"


def test_env_example_documents_every_setting() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    missing = [name for name in sorted(setting_names())
               if not re.search(rf"^(# )?{name}=", text, re.MULTILINE)]
    assert not missing, f".env.example does not document {missing}"
    for name in setting_names():
        line = re.search(rf"^(# )?{name}=.*$", text, re.MULTILINE)
        assert line is not None
        before = text[:line.start()].rstrip("\n").splitlines()
        assert before and before[-1].startswith("# ") and not before[-1].startswith(
            "# CRAWLFLEET_"), f".env.example: {name} has no comment saying what it does"
    effective_settings(files.env_example(), ".env.example")


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_crawlfleet_value_parses(path: Path) -> None:
    docs = [compose()] if path == COMPOSE else load_yaml(path)
    password = example_secrets()["crawlfleet-redis"]["password"]
    for doc in docs:
        for name, value in env_pairs(doc):
            value = files.expand_k8s(str(value), {"REDIS_PASSWORD": password})
            effective_settings({name: value}, f"{rel(path)}: {name}")


def allow_private_values(path: Path) -> list[Any]:
    values: list[Any] = []
    if path == DOCKERFILE:
        values += [v for n, v in dockerfile_env().items() if n == "CRAWLFLEET_ALLOW_PRIVATE"]
    elif path == ENV_EXAMPLE:
        values += [v for n, v in files.env_example().items() if n == "CRAWLFLEET_ALLOW_PRIVATE"]
    else:
        values += [v for doc in load_yaml(path) for n, v in env_pairs(doc)
                   if n == "CRAWLFLEET_ALLOW_PRIVATE"]
    # Also any textual assignment (comments included), whatever the syntax around it.
    text = path.read_text(encoding="utf-8")
    values += re.findall(r"CRAWLFLEET_ALLOW_PRIVATE[\"']?\s*[:=]\s*[\"']?([^\s\"'#]*)", text)
    return values


@pytest.mark.parametrize("path", [p for p in DEPLOY_FILES if p != COMPOSE], ids=rel)
def test_allow_private_is_never_enabled(path: Path) -> None:
    for value in allow_private_values(path):
        if isinstance(value, str) and ("${" in value or "$(" in value):
            pytest.fail(f"{rel(path)}: CRAWLFLEET_ALLOW_PRIVATE must not come from the outside")
        enabled = effective_settings({"CRAWLFLEET_ALLOW_PRIVATE": value}, rel(path)).allow_private
        assert not enabled, f"{rel(path)} enables CRAWLFLEET_ALLOW_PRIVATE ({value!r})"


def test_compose_allows_private_addresses_only_to_the_demo_worker() -> None:
    """The demo's worker crawls the test web on loopback, in the test web's own network
    namespace; no other service, and no value from .env, may turn the guard off."""
    assert not [v for v in allow_private_values(COMPOSE) if "${" in str(v)], (
        "docker-compose.yml: CRAWLFLEET_ALLOW_PRIVATE must not come from .env")
    enabled = []
    for name, service in compose_services().items():
        env = files.compose_service_env(service)
        if "CRAWLFLEET_ALLOW_PRIVATE" in env and effective_settings(
                {"CRAWLFLEET_ALLOW_PRIVATE": env["CRAWLFLEET_ALLOW_PRIVATE"]}, name).allow_private:
            enabled.append(name)
            assert service.get("profiles") == [DEMO_PROFILE], f"{name}: not in the demo profile"
            assert service.get("network_mode") == "service:testweb", (
                f"{name}: CRAWLFLEET_ALLOW_PRIVATE=1 outside the test web's network namespace")
        elif (compose_crawlfleet_argv(service) or ["testweb"])[0] != "testweb":
            assert env.get("CRAWLFLEET_ALLOW_PRIVATE") in ("0", "false"), (
                f"service {name} must fix CRAWLFLEET_ALLOW_PRIVATE to 0 over .env")
    assert enabled == ["demo-worker"], enabled


def test_configmap_values_are_strings() -> None:
    for name, obj in all_rendered():
        if obj["kind"] == "ConfigMap":
            for key, value in (obj.get("data") or {}).items():
                assert isinstance(value, str), (
                    f"{where_of(name, obj)} {key} is {value!r}, not a string (quote it)")


def base_configmap() -> dict[str, str]:
    (config,) = [o for o in render("base") if o["kind"] == "ConfigMap"]
    return dict(config["data"])


def test_compose_settings_match_the_configmap() -> None:
    """.env.example (compose) and the base ConfigMap (k8s) set the same values."""
    env = files.env_example()
    for key, value in base_configmap().items():
        if key == "CRAWLFLEET_ALLOW_PRIVATE":  # fixed by docker-compose.yml itself
            continue
        assert key in env, f".env.example does not set {key}, which the ConfigMap sets"
        ours = effective_settings({key: env[key]}, ".env.example")
        theirs = effective_settings({key: value}, "configmap.yaml")
        field = key.removeprefix("CRAWLFLEET_").lower()
        assert getattr(ours, field) == getattr(theirs, field), (
            f"{key}: .env.example says {env[key]!r}, k8s/base/configmap.yaml {value!r}")


def test_worker_ids_are_never_shared() -> None:
    """A shared CRAWLFLEET_WORKER_ID gives every worker one health-check key, and lets two
    schedulers both believe they hold the leader lock."""
    assert "CRAWLFLEET_WORKER_ID" not in files.env_example(), ".env.example sets a worker id"
    for name, obj in all_rendered():
        if obj["kind"] == "ConfigMap":
            assert "CRAWLFLEET_WORKER_ID" not in (obj.get("data") or {}), where_of(name, obj)
    for service_name, service in compose_services().items():
        env = files.compose_service_env(service)
        if "CRAWLFLEET_WORKER_ID" in env:
            assert service.get("network_mode") == "service:testweb", service_name
            assert "deploy" not in service and "scale" not in service, (
                f"{service_name}: a fixed worker id on a service with replicas")


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


def test_dockerfile_stop_signal_env_and_output_dir() -> None:
    stage = dockerfile_final_stage()
    signals = [args for keyword, args in stage if keyword == "STOPSIGNAL"]
    assert signals and signals[-1] in ("SIGTERM", "15"), f"STOPSIGNAL is {signals}"
    env = dockerfile_env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("CRAWLFLEET_LOG_FORMAT") == "json"
    # A new named volume takes the ownership of the image's directory: the sink's output
    # volume must be the crawlfleet user's, or a read-only container cannot write results.
    user = [args for keyword, args in stage if keyword == "USER"][-1]
    runs = " ".join(args for keyword, args in stage if keyword == "RUN")
    assert "/data/output" in runs and f"chown {user}" in runs.replace("chown  ", "chown "), (
        "the runtime stage must create /data/output owned by its USER")


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
    for path in (".venv/bin/python", ".git/HEAD", ".pytest_cache/README.md", ".env",
                 ".env.example", "common/__pycache__/settings.cpython-311.pyc", ".mypy_cache/x"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = ["pyproject.toml"]
    if isinstance(pyproject["project"].get("readme"), str):
        needed.append(pyproject["project"]["readme"])
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"].values()
    needed += [f"{folder}/__init__.py" for folder in package_dirs]
    needed += ["common/commands/admit.lua"]
    for path in needed:
        assert not dockerignored(path), f".dockerignore drops {path}, which `pip install .` needs"


# ------------------------------------------------------------------------------------------------
# One image everywhere
# ------------------------------------------------------------------------------------------------


def test_one_image_name_and_tag_everywhere() -> None:
    expected = f"{IMAGE}:{project_version()}"
    header = re.findall(r"^#\s+docker build -t (\S+) \.", DOCKERFILE.read_text(), re.MULTILINE)
    assert header == [expected], f"the Dockerfile's header tags {header}, want {expected}"
    for name, service in compose_services().items():
        if compose_crawlfleet_argv(service) is not None:
            assert service.get("image") == expected, f"compose {name}: image {service.get('image')}"
    seen = set()
    for name, obj in all_rendered():
        for workload, container in crawlfleet_containers([obj]):
            seen.add(name)
            # A registry prefix is allowed (newName); the name and tag are not negotiable.
            image, tag = split_image(container["image"])
            assert (image.rsplit("/", 1)[-1], tag) == (IMAGE, project_version()), (
                f"{where_of(name, workload, container)}: image {container['image']}")
    assert seen == set(KUSTOMIZATIONS), f"kustomizations without a crawlfleet image: {seen}"


# ------------------------------------------------------------------------------------------------
# docker-compose.yml
# ------------------------------------------------------------------------------------------------


@cache
def compose_schema() -> dict[str, Any]:
    # check-jsonschema vendors the Compose Specification's schema (compose-spec/compose-spec's
    # schema/compose-spec.json), so no copy is kept here.
    source = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(source.joinpath("compose-spec.json").read_text())
    return schema


def compose_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [f"{e.json_path}: {e.message[:300]}" for e in validator.iter_errors(doc)]


def test_compose_file_follows_the_compose_specification() -> None:
    assert compose_errors(files.compose_raw()) == []
    assert compose_errors(compose()) == []  # and once interpolated with .env.example


def test_compose_schema_check_catches_a_typo() -> None:
    broken = json.loads(json.dumps(compose()))
    broken["services"]["worker"]["stop_grace_perod"] = "30s"
    assert compose_errors(broken), "the Compose schema accepted an unknown service field"


def test_compose_needs_the_redis_password() -> None:
    with pytest.raises(files.MissingVariable, match="REDIS_PASSWORD"):
        files.compose({k: v for k, v in files.env_example().items() if k != "REDIS_PASSWORD"})


def test_compose_has_no_version_key() -> None:
    assert "version" not in compose(), "the compose spec has no `version:`"


def test_compose_commands_are_crawlfleet_subcommands() -> None:
    checked = set()
    for name, service in compose_services().items():
        argv = compose_crawlfleet_argv(service)
        if argv is not None:
            check_crawlfleet_argv(argv, f"docker-compose.yml service {name}")
            checked.add(argv[0])
    assert checked >= {"scheduler", "worker", "sink", "seed", "testweb"}, checked


def test_compose_schedulers_lead_and_stand_by() -> None:
    schedulers = compose_services_running("scheduler")
    replicas = sum((s.get("deploy") or {}).get("replicas", 1) for _, s in schedulers)
    assert replicas >= 2, f"want a leader and a standby, got {replicas} scheduler(s)"


def test_compose_worker_stop_grace_period_exceeds_shutdown_grace() -> None:
    workers = compose_services_running("worker") + compose_services_running(
        "worker", profile=DEMO_PROFILE)
    assert len(workers) == 2, "want the fleet's worker and the demo's"
    for name, service in workers:
        env = files.compose_service_env(service)
        grace = effective_settings(env, f"service {name}").shutdown_grace
        assert "stop_grace_period" in service, f"service {name} has no stop_grace_period"
        period = duration_seconds(service["stop_grace_period"])
        assert period > grace, (
            f"service {name}: stop_grace_period {period:g}s must exceed "
            f"CRAWLFLEET_SHUTDOWN_GRACE {grace:g}s, or Docker kills workers mid hand-back"
        )


def test_compose_worker_healthcheck_runs_crawlfleet_health() -> None:
    for name, service in compose_services_running("worker") + compose_services_running(
            "worker", profile=DEMO_PROFILE):
        test = as_argv(service["healthcheck"]["test"])
        command = test[1:] if test[0] == "CMD" else shlex.split(test[1])
        assert "crawlfleet" in command and "health" in command, f"{name}: healthcheck {test}"
        assert not service.get("init"), (
            f"{name}: with `init:` the worker is no longer PID 1, and its id not <hostname>-1")


def test_compose_redis_has_aof_password_maxmemory_volume_and_healthcheck() -> None:
    redis = [(n, s) for n, s in compose_services().items()
             if split_image(str(s.get("image", "")))[0].rsplit("/", 1)[-1] == "redis"]
    assert len(redis) == 1, "want one redis service"
    name, service = redis[0]
    password = files.env_example()["REDIS_PASSWORD"]
    limit = memory_bytes(service["deploy"]["resources"]["limits"]["memory"], "compose")
    check_redis_flags(as_argv(service.get("command")), f"compose service {name}", password, limit)
    mounts = [str(v).split(":")[1] for v in service.get("volumes", []) if isinstance(v, str)]
    assert "/data" in mounts, f"service {name}: /data (the AOF) is not on a volume"
    test = " ".join(as_argv(service.get("healthcheck", {}).get("test")))
    assert "redis-cli" in test and "ping" in test, f"service {name}: healthcheck is {test!r}"
    assert service.get("environment", {}).get("REDISCLI_AUTH") == password, (
        f"service {name}: the healthcheck's redis-cli needs REDISCLI_AUTH")
    for other, dependent in compose_services().items():
        argv = compose_crawlfleet_argv(dependent)
        if argv is not None and argv[0] != "testweb":
            depends = dependent.get("depends_on") or {}
            assert isinstance(depends, dict), f"service {other}: depends_on needs conditions"
            condition = depends.get(name, {}).get("condition")
            assert condition == "service_healthy", f"service {other} must wait for {name} healthy"


def test_compose_clients_use_the_password_and_the_redis_service() -> None:
    password = files.env_example()["REDIS_PASSWORD"]
    for name, service in compose_services().items():
        argv = compose_crawlfleet_argv(service)
        if argv is None or argv[0] == "testweb":
            continue
        url = effective_settings(files.compose_service_env(service), name).redis_url
        parts = urlsplit(url)
        assert (parts.hostname, parts.password) == ("redis", password), f"{name}: {url}"


def test_compose_sink_writes_to_its_volume() -> None:
    volumes = compose().get("volumes") or {}
    sinks = compose_services_running("sink") + compose_services_running(
        "sink", profile=DEMO_PROFILE)
    assert len(sinks) == 2, "want the fleet's sink and the demo's"
    for name, service in sinks:
        output = effective_settings(files.compose_service_env(service), name).output
        assert output, f"service {name}: no CRAWLFLEET_OUTPUT"
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes", [])}
        assert output in mounts, f"service {name}: {output} is not a mounted volume"
        assert mounts[output] in volumes, f"service {name}: {mounts[output]} is not a volume"
    (seed_name, seed), = compose_services_running("seed", profile="tools")
    assert any(str(v).startswith("output:") for v in seed.get("volumes", [])), (
        f"service {seed_name}: export and check need the output volume")


def test_compose_demo_crawls_the_test_web_in_its_own_namespace() -> None:
    services = compose_services()
    demo = {n: s for n, s in services.items() if DEMO_PROFILE in (s.get("profiles") or [])}
    roles = {(compose_crawlfleet_argv(s) or [""])[0]: n for n, s in demo.items()}
    assert set(roles) == {"testweb", "scheduler", "worker", "sink", "seed"}, roles
    namespaces = {n: effective_settings(files.compose_service_env(s), n).namespace
                  for n, s in demo.items() if n != roles["testweb"]}
    fleet = effective_settings(files.compose_service_env(services["scheduler"]), "scheduler")
    assert len(set(namespaces.values())) == 1 and fleet.namespace not in namespaces.values(), (
        f"the demo needs a namespace of its own, so that the fleet's workers never take its "
        f"jobs: {namespaces}")
    web = build_web_parser().parse_args(as_argv(demo[roles["testweb"]]["command"])[1:])
    worker = effective_settings(files.compose_service_env(demo[roles["worker"]]), "demo-worker")
    assert worker.dns_nameservers == (f"127.0.0.1:{web.dns_port}",)
    seeds = as_argv(demo[roles["seed"]]["command"])[1:]
    assert seeds == [f"http://site{i}.test:{web.port}/" for i in range(web.hosts)], seeds
    assert demo[roles["seed"]]["depends_on"]["testweb"]["condition"] == "service_healthy"


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
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "--profile",
         "tools", "--profile", DEMO_PROFILE, "config", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------
# k8s/: rendering and schemas
# ------------------------------------------------------------------------------------------------


def test_every_manifest_is_rendered_or_an_example() -> None:
    """No file in k8s/ is forgotten: each is a kustomization, listed by one (a resource or a
    patch), or an example applied by hand."""
    used = set()
    for name in KUSTOMIZATIONS:
        directory = K8S / name
        (spec,) = load_yaml(directory / "kustomization.yaml")
        used.add(directory / "kustomization.yaml")
        for entry in spec.get("resources", []):
            path = (directory / entry).resolve()
            assert path.exists(), f"k8s/{name}/kustomization.yaml lists missing {entry}"
            used.add(path)
        used |= {(directory / p["path"]).resolve() for p in spec.get("patches", []) if "path" in p}
        for generator in spec.get("configMapGenerator", []):
            used |= {(directory / f.rpartition("=")[2]).resolve() for f in generator["files"]}
    directories = {(K8S / name).resolve() for name in KUSTOMIZATIONS}
    for path in sorted(K8S.rglob("*")):
        if not path.is_file() or path.name.endswith(".example.yaml"):
            continue
        # Manifests anywhere, and whatever sits in a kustomization's folder (k8s/grafana's
        # dashboard is imported into Grafana, not applied).
        if path.suffix in (".yaml", ".yml") or path.parent.resolve() in directories:
            assert path.resolve() in used, f"{rel(path)} is in no kustomization"


def test_every_kustomization_renders_with_the_features_we_render() -> None:
    for name in KUSTOMIZATIONS:
        kinds = {obj["kind"] for obj in render(name)}
        assert kinds, f"k8s/{name} renders nothing"
    assert {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Service", "Deployment",
            "PersistentVolumeClaim", "PodDisruptionBudget", "NetworkPolicy"} <= {
        obj["kind"] for obj in render("overlays/local")}
    assert "ScaledObject" in {obj["kind"] for obj in render("overlays/production")}
    assert "HorizontalPodAutoscaler" in {obj["kind"] for obj in render("overlays/hpa")}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kubectl_kustomize_renders_the_same(name: str) -> None:
    """The renderer of tests/deploy_files.py against the real one, where it is installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl binary (k8s/ is rendered by tests/deploy_files.py alone)")
    result = subprocess.run([kubectl, "kustomize", str(K8S / name)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr

    def keyed(objects: Any) -> dict[tuple[str, str, str], Any]:
        return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
                for o in objects if o}

    theirs = keyed(yaml.safe_load_all(result.stdout))
    ours = keyed(render(name))
    assert sorted(ours) == sorted(theirs)
    for key, obj in ours.items():
        assert obj == theirs[key], f"k8s/{name}: {key} renders differently from kubectl"


def k8s_validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@cache
def keda_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(KEDA_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid(name: str) -> None:
    for obj in render(name):
        where = where_of(name, obj)
        if obj["apiVersion"].startswith("keda.sh/"):
            errors = [f"{e.json_path}: {e.message}" for e in keda_validator().iter_errors(obj)]
            assert not errors, f"{where}: {errors}"
            continue
        try:
            k8s_validate(obj)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {path}: {exc.message} (Kubernetes {KUBERNETES_VERSION})")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}: add its schema under tests/schemas/")


def test_example_secrets_are_valid_placeholders() -> None:
    examples = sorted(K8S.rglob("*.example.yaml"))
    assert examples
    for path in examples:
        for doc in load_yaml(path):
            k8s_validate(doc)
    secrets = [*example_secrets().values(),
               *(o.get("stringData") or {} for _, o in all_rendered() if o["kind"] == "Secret")]
    for values in secrets:
        assert not [o for _, o in all_rendered() if o["kind"] == "Secret" and "data" in o]
        for key, value in values.items():
            assert re.fullmatch(r"(change-me|local-only)[a-z-]*", value), (
                f"{key}: {value!r} does not look like a placeholder")
    # Every Redis password goes into a redis:// URL: it must need no escaping there.
    for values in secrets:
        if "password" in values:
            assert re.fullmatch(r"[A-Za-z0-9._~-]+", values["password"]), values


def test_the_validators_catch_mistakes() -> None:
    (deployment,) = [o for o in render("base") if o["metadata"]["name"] == "crawlfleet-worker"
                     and o["kind"] == "Deployment"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(broken)
    (scaled,) = [o for o in render("overlays/production") if o["kind"] == "ScaledObject"]
    for mutate in (lambda s: s["spec"].update(minReplicas=0),
                   lambda s: s["spec"]["triggers"][0]["metadata"].pop("query"),
                   lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=32)):
        broken = json.loads(json.dumps(scaled))
        mutate(broken)
        assert list(keda_validator().iter_errors(broken)), "the KEDA schema accepted a mistake"


def test_k8s_objects_have_kind_name_and_namespace() -> None:
    for name, obj in all_rendered():
        assert obj.get("apiVersion") and obj.get("kind"), f"k8s/{name}: apiVersion/kind missing"
        metadata = obj.get("metadata") or {}
        assert metadata.get("name"), f"k8s/{name}: {obj['kind']} has no name"
        if obj["kind"] != "Namespace":
            assert metadata.get("namespace") == "crawlfleet", where_of(name, obj)


def test_secret_references_exist() -> None:
    """Each secretKeyRef names a Secret the kustomization renders, or one made by hand from an
    example file, with that key."""
    for name in KUSTOMIZATIONS:
        available = {**example_secrets(), **files.rendered_secrets(list(render(name)))}
        for obj in render(name):
            spec = pod_spec(obj)
            for container in containers(spec) if spec else []:
                for item in container.get("env", []):
                    ref = item.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in available.get(ref["name"], {}), (
                            f"{where_of(name, obj, container)}: Secret {ref['name']} has no "
                            f"{ref['key']} (neither rendered nor in a *.example.yaml)")


# ------------------------------------------------------------------------------------------------
# k8s/: what the objects say
# ------------------------------------------------------------------------------------------------


def container_env(name: str, obj: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    # A seed Job runs in the namespace the fleet made: its ConfigMap is its fleet's.
    objects = [*render(name), *(render(SEED_OF[name]) if name in SEED_OF else ())]
    secrets = {**example_secrets(), **files.rendered_secrets(objects)}
    return files.k8s_container_env(objects, obj, container,
                                   pod_name=f"{obj['metadata']['name']}-0", secrets=secrets)


def workloads_running(name: str, subcommand: str
                      ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(obj, c) for obj, c in crawlfleet_containers(list(render(name)))
            if k8s_argv(c)[0] == subcommand]


def k8s_argv(container: dict[str, Any]) -> list[str]:
    command = as_argv(container.get("command"))
    args = as_argv(container.get("args")) if "args" in container else None
    if command:
        assert Path(command[0]).name == "crawlfleet", f"command {command} is not crawlfleet"
        return command[1:] + (args or [])
    return args if args is not None else dockerfile_default_cmd()


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_k8s_commands_are_crawlfleet_subcommands(name: str) -> None:
    for obj, container in crawlfleet_containers(list(render(name))):
        check_crawlfleet_argv(k8s_argv(container), where_of(name, obj, container))
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            if command and command[0] == "crawlfleet":
                check_crawlfleet_argv(command[1:], f"{where_of(name, obj, container)} {probe}")


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_k8s_clients_use_the_secret_password(name: str) -> None:
    """CRAWLFLEET_REDIS_URL carries the Secret's password: $(REDIS_PASSWORD) is expanded by the
    kubelet only from a variable defined before it."""
    for obj, container in crawlfleet_containers(list(render(name))):
        where = where_of(name, obj, container)
        env = container_env(name, obj, container)
        settings = effective_settings(env, where)
        urls = settings.shard_urls
        assert len(urls) == shards(name), f"{where}: {len(urls)} Redis URL(s)"
        for index, url in enumerate(urls):
            parts = urlsplit(url)
            assert parts.password == env["REDIS_PASSWORD"], f"{where}: no password in the URL"
            # Shard i is the StatefulSet's pod i, behind the headless Service.
            assert parts.hostname == f"redis-{index}.redis", f"{where}: {parts.hostname}"


def test_k8s_schedulers_lead_and_stand_by() -> None:
    for name in FLEETS:
        schedulers = workloads_running(name, "scheduler")
        assert len(schedulers) == 1, f"k8s/{name}: want one scheduler Deployment"
        obj, _ = schedulers[0]
        want = shards(name) + 1
        assert obj["kind"] == "Deployment" and obj["spec"].get("replicas", 1) >= want, (
            f"{where_of(name, obj)}: want {want} replicas (one leads each of {shards(name)} "
            "shard(s), one stands by)")


def test_k8s_sharded_overlay_shares_one_shard_list() -> None:
    """overlays/sharded: every crawlfleet container, its seed Job's too, carries the same
    CRAWLFLEET_REDIS_URLS (the order is the shards' identity), built from the Secret's password
    as the base builds CRAWLFLEET_REDIS_URL; one Redis pod per entry; shards + 1 schedulers."""
    fleet, seed = "overlays/sharded", "overlays/sharded/seed"
    values: set[str] = set()
    roles: dict[str, str] = {}
    for name in (fleet, seed):
        for obj, container in crawlfleet_containers(list(render(name))):
            where = where_of(name, obj, container)
            roles[k8s_argv(container)[0]] = where
            names = [item["name"] for item in container["env"]]
            assert names.count("CRAWLFLEET_REDIS_URLS") == 1, f"{where}: no shard list"
            (password,) = [i for i in container["env"] if i["name"] == "REDIS_PASSWORD"]
            assert password["valueFrom"]["secretKeyRef"] == {
                "name": "crawlfleet-redis", "key": "password"}, where
            assert names.index("REDIS_PASSWORD") < names.index("CRAWLFLEET_REDIS_URLS"), (
                f"{where}: $(REDIS_PASSWORD) expands only from a variable defined before it")
            (item,) = [i for i in container["env"] if i["name"] == "CRAWLFLEET_REDIS_URLS"]
            values.add(item["value"])
            env = container_env(name, obj, container)
            urls = effective_settings(env, where).shard_urls
            passwords = [urlsplit(url).password for url in urls]
            assert passwords == [env["REDIS_PASSWORD"]] * SHARDS[fleet], where
    assert set(roles) == {"scheduler", "worker", "sink", "seed"}, roles
    assert len(values) == 1, f"k8s/{fleet} and k8s/{seed} disagree on the shard list: {values}"
    (value,) = values
    assert value.count("$(REDIS_PASSWORD)") == SHARDS[fleet], value
    # The password comes from the Secret only: no ConfigMap names the list or holds a password.
    secrets = {**example_secrets(), **files.rendered_secrets(list(render(fleet)))}
    for name in (fleet, seed):
        for obj in render(name):
            if obj["kind"] == "ConfigMap":
                data = obj.get("data") or {}
                assert "CRAWLFLEET_REDIS_URLS" not in data, where_of(name, obj)
                assert not any(p in str(v) for v in data.values()
                               for p in (secrets["crawlfleet-redis"]["password"], "@redis-")), (
                    where_of(name, obj))
    from crawlfleet.common.shards import parse_redis_urls

    password = uuid.uuid4().hex
    urls = parse_redis_urls(files.expand_k8s(value, {"REDIS_PASSWORD": password}))
    hosts = [urlsplit(url).hostname for url in urls]
    assert hosts == [f"redis-{i}.redis" for i in range(SHARDS[fleet])], hosts
    assert len(set(hosts)) == len(hosts) == 3
    for url in urls:
        parts = urlsplit(url)
        assert (parts.password, parts.port, parts.path) == (password, 6379, "/0"), url
    # One Redis pod per shard, each its own server with its own volume, and none held back by
    # another's readiness; schedulers: one per shard, one standing by.
    (redis,) = [o for o in render(fleet) if o["kind"] == "StatefulSet"]
    assert redis["spec"]["replicas"] == len(urls), "one Redis pod per entry"
    assert redis["spec"]["serviceName"] == "redis" and redis["metadata"]["name"] == "redis"
    assert redis["spec"].get("podManagementPolicy") == "Parallel", (
        "OrderedReady would keep a shard's pod from returning while another shard is not ready")
    ((scheduler, _),) = workloads_running(fleet, "scheduler")
    assert scheduler["spec"]["replicas"] == len(urls) + 1


@pytest.mark.parametrize("name", FLEETS)
def test_k8s_pods_have_their_own_worker_id(name: str) -> None:
    for role in ("scheduler", "worker", "sink"):
        for obj, container in workloads_running(name, role):
            items = {i["name"]: i for i in container.get("env", [])}
            item = items.get("CRAWLFLEET_WORKER_ID", {})
            assert item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == \
                "metadata.name", f"{where_of(name, obj, container)}: id from the pod's name"


@pytest.mark.parametrize("name", FLEETS)
def test_k8s_worker_grace_period_and_probes(name: str) -> None:
    workers = workloads_running(name, "worker")
    assert len(workers) == 1, f"k8s/{name}: want one worker Deployment"
    obj, container = workers[0]
    where = where_of(name, obj, container)
    settings = effective_settings(container_env(name, obj, container), where)
    spec = pod_spec(obj)
    assert spec is not None
    period = spec.get("terminationGracePeriodSeconds")
    assert period is not None and period > settings.shutdown_grace, (
        f"{where}: terminationGracePeriodSeconds {period} must exceed "
        f"CRAWLFLEET_SHUTDOWN_GRACE {settings.shutdown_grace:g}, or the kubelet kills workers "
        "mid hand-back")
    for kind in ("livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        assert probe, f"{where}: no {kind}"
        assert probe["exec"]["command"] == ["crawlfleet", "health"], f"{where}: {kind}"
        # The probe gives up on Redis after DEADLINE; the kubelet must not cut it short.
        assert probe.get("timeoutSeconds", 1) > health_command.DEADLINE, f"{where}: {kind}"
        # A probe more often than the health key's life could only see the same key again.
        assert probe.get("periodSeconds", 10) >= settings.health_check_interval, where
    liveness = container["livenessProbe"]
    patience = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    assert patience >= 60, f"{where}: liveness restarts every worker after {patience} s of Redis"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_k8s_crawlfleet_containers_are_locked_down(name: str) -> None:
    for obj, container in crawlfleet_containers(list(render(name))):
        spec = pod_spec(obj)
        assert spec is not None
        where = where_of(name, obj, container)
        pod_security = spec.get("securityContext", {})
        security = container.get("securityContext", {})
        non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
        assert non_root is True, f"{where}: runAsNonRoot is not set"
        assert security.get("readOnlyRootFilesystem") is True, f"{where}: writable root fs"
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: read-only root needs a /tmp volume"
        resources = container.get("resources", {})
        assert resources.get("limits") and resources.get("requests"), f"{where}: resources"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: needs no API token"


@pytest.mark.parametrize("name", FLEETS)
def test_k8s_redis_statefulset(name: str) -> None:
    found = []
    for obj in render(name):
        spec = pod_spec(obj)
        for container in containers(spec) if spec else []:
            if split_image(container["image"])[0].rsplit("/", 1)[-1] == "redis":
                found.append((obj, container))
    assert len(found) == 1, f"k8s/{name}: want one Redis container"
    obj, container = found[0]
    where = where_of(name, obj, container)
    assert obj["kind"] == "StatefulSet", f"{where}: Redis must be a StatefulSet"
    # One pod per shard: each pod is a Redis of its own (not a replica), one shard.
    assert obj["spec"].get("replicas") == shards(name), (
        f"{where}: Redis replicas must be {shards(name)}, one per shard")
    env = container_env(name, obj, container)
    argv = [files.expand_k8s(a, env) for a in
            as_argv(container.get("command")) + as_argv(container.get("args"))]
    secrets = {**example_secrets(), **files.rendered_secrets(list(render(name)))}
    password = secrets["crawlfleet-redis"]["password"]
    limit = memory_bytes(container["resources"]["limits"]["memory"], "k8s")
    check_redis_flags(argv, where, password, limit)
    assert env.get("REDISCLI_AUTH") == password, f"{where}: the probe's redis-cli needs it"
    claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
    data = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/data"]
    assert data and data[0]["name"] in claims, f"{where}: /data is not on a PVC template"
    probe = " ".join(as_argv(container.get("readinessProbe", {}).get("exec", {}).get("command")))
    assert "redis-cli" in probe and "ping" in probe, f"{where}: readiness probe is {probe!r}"
    services = [o for o in render(name) if o["kind"] == "Service"
                and o["metadata"]["name"] == obj["spec"].get("serviceName")]
    assert services and services[0]["spec"].get("clusterIP") == "None", (
        f"{where}: no headless Service {obj['spec'].get('serviceName')!r}")


@pytest.mark.parametrize("name", FLEETS)
def test_k8s_sink_output(name: str) -> None:
    sinks = workloads_running(name, "sink")
    assert len(sinks) == 1, f"k8s/{name}: want one sink Deployment"
    obj, container = sinks[0]
    where = where_of(name, obj, container)
    env = container_env(name, obj, container)
    output = effective_settings(env, where).output
    assert output, f"{where}: no CRAWLFLEET_OUTPUT"
    spec = pod_spec(obj)
    assert spec is not None
    if output.startswith("s3://"):
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), where
        items = {i["name"]: i for i in container["env"]}
        assert "secretKeyRef" in items["AWS_SECRET_ACCESS_KEY"].get("valueFrom", {}), where
        return
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert output in mounts, f"{where}: {output} is not a mounted volume"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claim = volumes[mounts[output]].get("persistentVolumeClaim", {}).get("claimName")
    assert claim in {o["metadata"]["name"] for o in render(name)
                     if o["kind"] == "PersistentVolumeClaim"}, f"{where}: no PVC {claim}"
    assert obj["spec"].get("replicas", 1) == 1 and obj["spec"]["strategy"]["type"] == \
        "Recreate", f"{where}: a ReadWriteOnce volume takes one pod, replaced, not rolled"


def test_production_writes_to_a_bucket_and_drops_the_volume() -> None:
    objects = render("overlays/production")
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    ((obj, container),) = workloads_running("overlays/production", "sink")
    output = effective_settings(container_env("overlays/production", obj, container), "").output
    assert output and output.startswith("s3://")


@pytest.mark.parametrize("name", FLEETS)
def test_k8s_pods_are_annotated_for_scraping(name: str) -> None:
    port = effective_settings(base_configmap(), "configmap.yaml").metrics_port
    assert port == 9100
    for obj, container in crawlfleet_containers(list(render(name))):
        if obj["kind"] != "Deployment":
            continue
        where = where_of(name, obj, container)
        annotations = obj["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", where
        assert annotations.get("prometheus.io/port") == str(port), where
        assert annotations.get("prometheus.io/path") == "/metrics", where
        assert {"name": "metrics", "containerPort": port} in container.get("ports", []), where
        env = container_env(name, obj, container)
        assert effective_settings(env, where).metrics_port == port, where


def evictions_allowed(budget: dict[str, Any], replicas: int) -> int:
    """How many of ``replicas`` healthy pods a PodDisruptionBudget lets a drain take at once
    (percentages round up, as the disruption controller rounds them)."""
    def count(value: Any) -> int:
        text = str(value)
        return math.ceil(int(text[:-1]) * replicas / 100) if text.endswith("%") else int(text)

    if "maxUnavailable" in budget:
        return count(budget["maxUnavailable"])
    return max(replicas - count(budget["minAvailable"]), 0)


@pytest.mark.parametrize("name", FLEETS)
def test_k8s_disruption_budgets(name: str) -> None:
    objects = render(name)
    budgets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PodDisruptionBudget"}
    covering: dict[str, list[dict[str, Any]]] = {}
    for role in ("worker", "scheduler"):
        ((obj, _),) = workloads_running(name, role)
        labels = obj["spec"]["template"]["metadata"]["labels"]
        covering[role] = [b for b in budgets.values()
                          if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering[role]) == 1, (
            f"k8s/{name}: want one PodDisruptionBudget for the {role}s")
    worker_budget = budgets["crawlfleet-worker"]["spec"]
    assert worker_budget.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
    # A drain takes at most as many schedulers as stand by (each lost leader's shard is taken
    # over by a standby), and never blocks (at least one may go).
    ((scheduler, _),) = workloads_running(name, "scheduler")
    replicas = scheduler["spec"]["replicas"]
    allowed = evictions_allowed(covering["scheduler"][0]["spec"], replicas)
    assert 1 <= allowed <= replicas - shards(name), (
        f"k8s/{name}: the schedulers' budget lets a drain take {allowed} of {replicas} "
        f"schedulers at once, for {shards(name)} shard(s)")


def network_policies(name: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o["spec"] for o in render(name) if o["kind"] == "NetworkPolicy"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


@pytest.mark.parametrize("name", FLEETS)
def test_k8s_only_crawlfleet_pods_reach_redis(name: str) -> None:
    objects = render(name)
    (redis,) = [o for o in objects if o["kind"] == "StatefulSet"]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in network_policies(name).values()
                if selects(p["podSelector"], redis_labels)]
    assert len(policies) == 1, f"k8s/{name}: want one NetworkPolicy for Redis"
    (policy,) = policies
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, f"k8s/{name}: Redis open beyond this namespace's pods"
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    everyone = [*files.crawlfleet_containers(list(objects))]
    seed_containers = [pair for seed in SEED_OF
                       for pair in files.crawlfleet_containers(list(render(seed)))]
    for obj, _ in [*everyone, *seed_containers]:
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selects(source["podSelector"], labels), f"{obj['metadata']['name']}: no Redis"
    assert not selects(source["podSelector"], {"app.kubernetes.io/part-of": "crawlfleet"}), (
        "a pod that is merely part-of the crawlfleet app reaches Redis")


@pytest.mark.parametrize("name", FLEETS)
def test_k8s_workers_reach_the_internet_but_not_the_cluster(name: str) -> None:
    ((worker, _),) = workloads_running(name, "worker")
    labels = worker["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in network_policies(name).values() if selects(p["podSelector"], labels)]
    assert len(policies) == 1, f"k8s/{name}: want one NetworkPolicy for the workers"
    (policy,) = policies
    assert "Egress" in policy["policyTypes"]
    blocks, dns, redis = [], [], []
    for rule in policy["egress"]:
        for peer in rule.get("to", []):
            if "ipBlock" in peer:
                blocks.append(peer["ipBlock"])
            elif peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns":
                dns.append(rule)
            elif peer.get("podSelector", {}).get("matchLabels", {}).get(
                    "app.kubernetes.io/name") == "redis":
                redis.append(rule)
            else:
                pytest.fail(f"k8s/{name}: unexpected egress peer {peer}")
    ipv4 = [b for b in blocks if b["cidr"] == "0.0.0.0/0"]
    assert len(ipv4) == 1 and set(ipv4[0]["except"]) >= PRIVATE_RANGES, ipv4
    for block in blocks:
        assert block["cidr"] in ("0.0.0.0/0", "::/0"), f"k8s/{name}: egress to {block['cidr']}"
    assert len(dns) == 1 and {(p["protocol"], p["port"]) for p in dns[0]["ports"]} == {
        ("UDP", 53), ("TCP", 53)}
    (dns_peer,) = dns[0]["to"]
    assert dns_peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"}
    assert len(redis) == 1 and redis[0]["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_k8s_worker_replicas_belong_to_whoever_scales_them() -> None:
    for name, autoscaler in (("base", None), ("overlays/local", None),
                             ("overlays/production", "ScaledObject"),
                             ("overlays/hpa", "HorizontalPodAutoscaler"),
                             ("overlays/sharded", None)):
        ((worker, _),) = workloads_running(name, "worker")
        scalers = [o for o in render(name) if o["kind"] in (
            "ScaledObject", "HorizontalPodAutoscaler")]
        if autoscaler is None:
            assert not scalers and worker["spec"].get("replicas", 0) >= 1, name
            continue
        (scaler,) = scalers
        assert scaler["kind"] == autoscaler, name
        assert scaler["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"], name
        assert "replicas" not in worker["spec"], (
            f"k8s/{name}: the {autoscaler} owns the workers' count; `replicas` would reset it "
            "on every apply")
    ((worker, _),) = workloads_running("overlays/local", "worker")
    assert worker["spec"]["replicas"] == 1, "the local overlay runs one worker"


def scaled_object() -> dict[str, Any]:
    (scaled,) = [o for o in render("overlays/production") if o["kind"] == "ScaledObject"]
    return scaled


def test_keda_scales_to_zero_on_the_hosts_with_work() -> None:
    spec = scaled_object()["spec"]
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] > 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    # Any threshold above 0 would leave a crawl with few hosts left at zero workers.
    assert float(metadata["activationThreshold"]) == 0
    assert metadata["ignoreNullValues"] == "false", "a lost target must not scale to zero"
    assert "fallback" in spec, "a failing query needs a fallback replica count"
    ((obj, container),) = workloads_running("overlays/production", "worker")
    settings = effective_settings(container_env("overlays/production", obj, container), "")
    assert float(metadata["threshold"]) == settings.jobs_per_worker, (
        "the threshold is hosts per worker: keep it CRAWLFLEET_JOBS_PER_WORKER")
    # Leased + waiting + queued: with zero workers a small crawl's hosts all wait for a claim,
    # so a query without the waiting ones would never wake the fleet.
    assert set(re.findall(r"\bcrawlfleet_[a-z_]+\b", metadata["query"])) == {
        "crawlfleet_hosts_with_work"}


def test_keda_query_names_metrics_that_exist() -> None:
    """The query's metric names are among those common/metrics.py serves."""
    metrics = importlib.import_module("crawlfleet.common.metrics")
    names: set[str] = set(metrics.metric_names())
    query = scaled_object()["spec"]["triggers"][0]["metadata"]["query"]
    missing = set(re.findall(r"\bcrawlfleet_[a-z_]+\b", query)) - names
    assert not missing, f"the KEDA query names metrics common/metrics.py lacks: {missing}"


@pytest.mark.parametrize("name", SEED_OF)
def test_seed_job_reads_its_configmap(name: str) -> None:
    objects = render(name)
    ((job, container),) = workloads_running(name, "seed")
    assert job["kind"] == "Job" and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    argv = k8s_argv(container)
    seed_file = argv[argv.index("--file") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    directory, _, key = seed_file.rpartition("/")
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    config_name = volumes[mounts[directory]]["configMap"]["name"]
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"
                 and o["metadata"]["name"] == config_name]
    assert key in config["data"], f"ConfigMap {config_name} has no {key}"
    from crawlfleet.cli.seed import parse_seed_lines

    seeds, errors = parse_seed_lines(config["data"][key].splitlines())
    assert seeds and not errors, errors


# ------------------------------------------------------------------------------------------------
# `crawlfleet health`, the workers' probe
# ------------------------------------------------------------------------------------------------


def probe_settings(**changes: Any) -> Settings:
    return Settings(redis_url=f"embedded://health-{uuid.uuid4().hex[:8]}", namespace="h",
                    worker_id="pod-a", health_check_interval=10).replace(**changes)


def write(settings: Settings, key: str, value: bytes, ttl_ms: int | None) -> None:
    async def go() -> None:
        redis = open_redis(settings.redis_url)
        try:
            if ttl_ms is None:
                await redis.set(key, value)
            else:
                await redis.psetex(key, ttl_ms, value)
        finally:
            await redis.aclose()

    asyncio.run(go())


def test_health_reads_the_workers_own_key(capsys: pytest.CaptureFixture[str]) -> None:
    settings = probe_settings()
    key = Keys("h").arq_health_check("pod-a")
    assert health_command.health(settings) == 1
    err = capsys.readouterr().err
    assert err == ("crawlfleet health: no health check from worker pod-a in the last 11 s "
                   "(namespace h)\n")
    # Another worker's key is not this one's health.
    write(settings, Keys("h").arq_health_check("pod-b"), b"x", 11_000)
    assert health_command.health(settings) == 1
    write(settings, key, b"Dec-02 05:26:01 j_complete=3 j_failed=0", 11_000)
    assert health_command.health(settings) == 0
    assert "worker pod-a: alive (Dec-02 05:26:01 j_complete=3" in capsys.readouterr().out
    # Same key in another namespace: not ours.
    assert health_command.health(settings.replace(namespace="other")) == 1
    capsys.readouterr()
    write(settings, key, b"x", None)
    assert health_command.health(settings) == 1
    assert "has no expiry" in capsys.readouterr().err


def test_health_key_is_the_one_the_worker_writes() -> None:
    from crawlfleet.workers.worker import worker_options

    for interval in (0.4, 10.0, 12.6):
        settings = probe_settings(health_check_interval=interval)
        options = worker_options(settings)
        assert options["health_check_key"] == Keys("h").arq_health_check("pod-a")
        # arq's expiry is its interval + 1 s: the window the probe reports.
        assert options["health_check_interval"] + 1 == health_command.health_window(settings)


def test_health_with_redis_unreachable_is_one_line_exit_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CRAWLFLEET_UVLOOP", "0")  # main() would install uvloop's policy here
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code = main(["health", "--redis-url", f"redis://:pw@127.0.0.1:{port}/0"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Redis is unreachable at redis://:***@127.0.0.1" in err
    assert "pw@" not in err


def test_health_gives_up_on_a_silent_redis(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A Redis that accepts and never answers: the probe ends by itself, one line, exit 1."""
    monkeypatch.setattr(health_command, "DEADLINE", 0.5)
    monkeypatch.setenv("CRAWLFLEET_UVLOOP", "0")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nobody ever reads
        port = silent.getsockname()[1]
        code = main(["health", "--redis-url", f"redis://127.0.0.1:{port}/0"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "no answer within 0.5 s" in err, err


@pytest.mark.parametrize("component", ["scheduler", "sink"])
def test_scheduler_and_sink_are_ready_on_their_healthz(component: str) -> None:
    """Their readiness probe asks /healthz on the port the ConfigMap's CRAWLFLEET_METRICS_PORT
    makes them serve (common/metrics.py)."""
    ((obj, container),) = workloads_running("base", component)
    probe = container["readinessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = effective_settings(container_env("base", obj, container), "")
    assert probe["path"] == "/healthz"
    assert ports[probe["port"]] == settings.metrics_port > 0
    assert "livenessProbe" not in container  # a Redis outage must not restart it
