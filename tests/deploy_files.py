"""Reading the deployment files as their tools do, with no tool installed.

- ``kustomize(dir)``: a small renderer for the kustomize features ``k8s/`` uses, and only those:
  ``resources`` (files and directories), ``namespace``, ``images``, ``configMapGenerator``
  (with ``disableNameSuffixHash``), and ``patches``: strategic merge (merge keys for the lists
  the overlays touch, ``null`` to delete a field, ``$patch: delete`` for a list item or a whole
  resource) and JSON 6902 (add, remove, replace). Any other kustomization field raises, so it
  never renders something ``kubectl kustomize`` would render differently without saying so;
  tests/test_deploy.py compares the two wherever kubectl is installed.
- Compose: ``.env`` parsing and ``${...}`` interpolation as compose does it, and the environment
  a service's container gets (``env_file`` then ``environment``).
- Kubernetes: the environment a container gets (``envFrom`` ConfigMaps, ``env`` with Secret and
  downward-API values, ``$(VAR)`` expansion), for the tests that run those commands.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# Every kustomization directory the project ships: the base, the seeding step, the overlays
# (overlays/sharded has its own seeding step, with the shard list).
KUSTOMIZATIONS = ("base", "seed", "overlays/local", "overlays/production", "overlays/hpa",
                  "overlays/sharded", "overlays/sharded/seed")

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod", "CronJob"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images",
                    "configMapGenerator", "generatorOptions"}
# Strategic-merge keys of the lists the overlays patch (k8s.io/api's patchMergeKey tags).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name"}


class Unsupported(Exception):
    """A kustomization uses something this renderer does not do."""


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


# ------------------------------------------------------------------------------------------------
# kustomize
# ------------------------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` prints (in no particular order)."""
    (spec,) = load_docs(directory / "kustomization.yaml")
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise Unsupported(f"{directory}: kustomization fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects += kustomize(path) if path.is_dir() else load_docs(path)
    objects += _generated_config_maps(directory, spec)
    for patch in spec.get("patches", []):
        objects = _apply_patch(directory, objects, patch)
    namespace = spec.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
    for image in spec.get("images", []):
        _set_image(objects, image)
    return objects


def _generated_config_maps(directory: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    generated = []
    options = spec.get("generatorOptions", {})
    for gen in spec.get("configMapGenerator", []):
        if set(gen) - {"name", "files", "literals", "options"} or set(options) - {
                "disableNameSuffixHash"}:
            raise Unsupported(f"{directory}: configMapGenerator {gen}")
        if not (options.get("disableNameSuffixHash")
                or gen.get("options", {}).get("disableNameSuffixHash")):
            raise Unsupported(f"{directory}: name suffix hashes (set disableNameSuffixHash)")
        data: dict[str, str] = {}
        for item in gen.get("files", []):
            key, _, name = item.rpartition("=") if "=" in item else ("", "", item)
            data[key or Path(name).name] = (directory / name).read_text(encoding="utf-8")
        for item in gen.get("literals", []):
            key, _, value = item.partition("=")
            data[key] = value
        metadata: dict[str, Any] = {"name": gen["name"]}
        labels = gen.get("options", {}).get("labels")
        if labels:
            metadata["labels"] = dict(labels)
        generated.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
                          "data": data})
    return generated


def _apply_patch(directory: Path, objects: list[dict[str, Any]],
                 entry: dict[str, Any]) -> list[dict[str, Any]]:
    if set(entry) - {"path", "patch", "target"}:
        raise Unsupported(f"{directory}: patch options {sorted(entry)}")
    text = (directory / entry["path"]).read_text(encoding="utf-8") if "path" in entry \
        else entry["patch"]
    body = yaml.safe_load(text)
    target = entry.get("target")
    if isinstance(body, list):  # JSON 6902
        if not target:
            raise Unsupported(f"{directory}: a JSON 6902 patch needs a target")
        matched = [obj for obj in objects if _matches(obj, target)]
        assert matched, f"{directory}: patch target {target} matches nothing"
        for obj in matched:
            for op in body:
                _json6902(obj, op)
        return objects
    if target:
        raise Unsupported(f"{directory}: a target on a strategic-merge patch")
    selector = {"kind": body["kind"], "name": body["metadata"]["name"],
                "group": body["apiVersion"].rpartition("/")[0],
                "version": body["apiVersion"].rpartition("/")[2]}
    if "namespace" in body["metadata"]:
        selector["namespace"] = body["metadata"]["namespace"]
    matched = [obj for obj in objects if _matches(obj, selector)]
    assert len(matched) == 1, f"{directory}: patch of {selector} matches {len(matched)} objects"
    if body.get("$patch") == "delete":
        return [obj for obj in objects if obj is not matched[0]]
    patch = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
    merged = strategic_merge(matched[0], patch)
    return [merged if obj is matched[0] else obj for obj in objects]


def _matches(obj: dict[str, Any], target: Mapping[str, Any]) -> bool:
    if set(target) - {"group", "version", "kind", "name", "namespace"}:
        raise Unsupported(f"patch target fields {sorted(target)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": obj["kind"],
              "name": obj["metadata"]["name"], "namespace": obj["metadata"].get("namespace")}
    return all(actual[key] == value for key, value in target.items())


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into ``original`` as a strategic merge patch does, for what the
    overlays use: maps merge, ``null`` deletes, lists with a merge key merge by it (the
    patch's items first, in its order, then the original's other items, as kustomize orders
    them), ``$patch: delete`` removes an item, other lists are replaced."""
    if isinstance(original, dict) and isinstance(patch, dict):
        result = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            elif key in result:
                result[key] = strategic_merge(result[key], value, key)
            else:
                result[key] = _without_directives(value)
        return result
    if isinstance(original, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        by_key = {item[key]: item for item in original}
        merged: list[Any] = []
        for item in patch:
            if item.get("$patch") == "delete":
                assert item[key] in by_key, f"$patch: delete of a missing {field} {item[key]}"
                by_key.pop(item[key])
                continue
            base = by_key.pop(item[key], None)
            merged.append(_without_directives(item) if base is None
                          else strategic_merge(base, item, ""))
        return merged + [item for item in original if item[key] in by_key]
    return _without_directives(patch)


def _without_directives(value: Any) -> Any:
    if isinstance(value, dict):
        if any(k.startswith("$") for k in value):
            raise Unsupported(f"patch directive in {value}")
        return {k: _without_directives(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_directives(v) for v in value]
    return value


def _json6902(obj: dict[str, Any], op: dict[str, Any]) -> None:
    if op["op"] not in ("add", "remove", "replace"):
        raise Unsupported(f"JSON 6902 op {op['op']}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op["op"] == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif op["op"] == "remove":
            del parent[index]
        else:
            parent[index] = copy.deepcopy(op["value"])
        return
    if op["op"] in ("remove", "replace"):
        assert last in parent, f"JSON 6902 {op['op']} of missing {op['path']}"
    if op["op"] == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(op["value"])


def split_image(image: str) -> tuple[str, str | None]:
    """``registry/name:tag`` -> (``registry/name``, ``tag``); a digest counts as no tag."""
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name, _, tag = name.rpartition(":")
        return name, tag
    return name, None


def _set_image(objects: list[dict[str, Any]], image: dict[str, Any]) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise Unsupported(f"images entry {image}")
    for obj in objects:
        spec = pod_spec(obj)
        for container in containers(spec) if spec else []:
            name, tag = split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            tag = image.get("newTag", tag)
            container["image"] = f"{name}:{tag}" if tag else name


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind not in POD_KINDS:
        return None
    if kind == "Pod":
        return dict(doc["spec"])
    if kind == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def rendered(name: str) -> list[dict[str, Any]]:
    """One of KUSTOMIZATIONS, rendered."""
    return kustomize(K8S / name)


def example_secrets() -> dict[str, dict[str, str]]:
    """The Secrets made by hand, from their example files (name -> key -> value)."""
    found = {}
    for path in sorted(K8S.rglob("*.example.yaml")):
        for doc in load_docs(path):
            if doc["kind"] == "Secret":
                found[doc["metadata"]["name"]] = dict(doc.get("stringData") or {})
    return found


# ------------------------------------------------------------------------------------------------
# Kubernetes: a container's environment
# ------------------------------------------------------------------------------------------------

_K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


def expand_k8s(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: defined variables are replaced, ``$$`` is ``$``,
    anything else is left as it is."""
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _K8S_VAR.sub(sub, text)


def k8s_container_env(objects: list[dict[str, Any]], workload: dict[str, Any],
                      container: dict[str, Any], *, pod_name: str,
                      secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """The environment the kubelet gives ``container``: envFrom ConfigMaps in order, then
    ``env`` in order (each value expanded against what is defined before it), with Secret keys
    from ``secrets`` and ``metadata.name`` = ``pod_name``."""
    namespace = workload["metadata"].get("namespace")
    maps = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("data") or {}
            for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert (namespace, ref) in maps, f"envFrom ConfigMap {ref} is not rendered"
        env.update({source.get("prefix", "") + k: str(v) for k, v in maps[namespace, ref].items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand_k8s(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
        else:
            raise Unsupported(f"env valueFrom {source}")
    return env


def rendered_secrets(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: dict(o.get("stringData") or {})
            for o in objects if o["kind"] == "Secret"}


def crawlfleet_containers(objects: list[dict[str, Any]]
                          ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container running the crawlfleet image."""
    for obj in objects:
        spec = pod_spec(obj)
        for container in containers(spec) if spec else []:
            if split_image(container["image"])[0].rsplit("/", 1)[-1] == "crawlfleet":
                yield obj, container


# ------------------------------------------------------------------------------------------------
# Compose
# ------------------------------------------------------------------------------------------------


def parse_dotenv(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines as compose reads a .env file: ``#`` lines and blank lines are
    skipped, one pair of matching quotes around a value is dropped."""
    values = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"line {number}: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            assert " #" not in value, f"line {number}: keep comments on their own lines"
        values[key] = value
    return values


def env_example() -> dict[str, str]:
    return parse_dotenv(ENV_EXAMPLE.read_text(encoding="utf-8"))


_COMPOSE_VAR = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset (compose refuses to run)."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation over a parsed file: ``$$``, ``$VAR``, ``${VAR}``,
    ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``${VAR?err}``, ``${VAR:+alt}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        empty = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if empty else str(current)
        if op in (":?", "?"):
            if empty:
                raise MissingVariable(f"{name}: {arg}")
            return str(current)
        if op in (":+", "+"):
            return "" if empty else arg
        return "" if current is None else current

    return _COMPOSE_VAR.sub(sub, value)


def compose_raw() -> dict[str, Any]:
    (doc,) = load_docs(COMPOSE)
    return doc


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml interpolated with ``env`` (default: .env.example as .env)."""
    result = interpolate(compose_raw(), env_example() if env is None else env)
    assert isinstance(result, dict)
    return result


def compose_service_env(service: dict[str, Any]) -> dict[str, str]:
    """The container environment of an interpolated service: its env_file(s), then
    ``environment`` (which wins). .env is .env.example."""
    env: dict[str, str] = {}
    files = service.get("env_file") or []
    for item in [files] if isinstance(files, str) else files:
        path = item if isinstance(item, str) else item["path"]
        source = ENV_EXAMPLE if path == ".env" else ROOT / path
        env.update(parse_dotenv(source.read_text(encoding="utf-8")))
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    env.update({k: "" if v is None else str(v) for k, v in environment.items()})
    return env


def as_argv(value: Any) -> list[str]:
    import shlex

    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]
