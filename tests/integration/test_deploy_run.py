"""What the deployment files run, run here: every compose service and every Kubernetes
container (k8s/overlays/local and k8s/seed) as a local process, with the command and the
environment the file gives it, against a local redis-server started with the file's own flags
and password, and the test web as the compose demo profile starts it. The probes run too.

Only what cannot be the same on this machine is rewritten (``localise``):
- Redis's address: the host and port of CRAWLFLEET_REDIS_URL (its password and database stay),
  and redis-server's --port/--bind/--dir; a probe's redis-cli gets ``-p PORT``;
- container paths (the output volume, the seeds mount) -> temporary directories;
- CRAWLFLEET_DNS_NAMESERVERS -> the test web's DNS server, CRAWLFLEET_ALLOW_PRIVATE=1 (the test
  web is on loopback), the test web's ports (free ones) in its command, the seeds and probes;
- CRAWLFLEET_METRICS_PORT -> a free port per process (they would all want 9100);
- the seed files' contents -> the test web's roots (example.com is not reachable here);
- compose's worker healthcheck names the worker ``$HOSTNAME-1`` (PID 1 in its container):
  here the worker has its own pid.

Then the three crawls (compose's fleet, compose's demo in its own namespace, the Kubernetes
fleet on its own Redis) must finish with the test web's reachable set in their output
directories, each URL once; ``crawlfleet check`` must exit 0 (run as the files say to: the
compose ``seed`` service, the k8s sink container); the worker probes must exit 0 for a live
worker and 1 once it stopped; every process must stop cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from .. import deploy_files as files
from ..conftest import CRAWLFLEET, WebUnderTest, free_port, start_testweb, wait_for
from ..deploy_files import as_argv, crawlfleet_containers, pod_spec

pytestmark = pytest.mark.integration

BIN = str(Path(sys.executable).parent)
# At most this many replicas of one role here (the machine has two cores).
MAX_REPLICAS = 2


def web_args(argv: list[str]) -> list[str]:
    """The compose testweb command's own arguments without its ports: what ``--print-reachable``
    needs beside the real ``--port`` (WebUnderTest.reachable)."""
    args = list(argv[1:])
    for flag in ("--port", "--dns-port"):
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    return args


@dataclass
class Processes:
    logdir: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-3000:]

    def alive(self) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}: {self.log(name)}")

    def stop(self, *names: str, timeout: float = 40) -> dict[str, int]:
        """SIGTERM to each (once: a second one during shutdown would kill it), then their exit
        codes."""
        stopping = {name: self.running.pop(name) for name in names}
        for process in stopping.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in stopping.items():
            try:
                codes[name] = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
                raise AssertionError(f"{name} did not stop on SIGTERM: {self.log(name)}") from None
        return codes

    def kill_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        self.running.clear()


def run(argv: list[str], env: dict[str, str], timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def run_all(commands: dict[str, tuple[list[str], dict[str, str]]], timeout: float = 60
            ) -> dict[str, subprocess.CompletedProcess[str]]:
    """``run`` for each of ``commands`` at once (two cores: one after another is slow)."""
    started = {name: subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, (argv, env) in commands.items()}
    done = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=timeout)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


# --------------------------------------------------------------------------------------------------
# Rewriting what must change here
# --------------------------------------------------------------------------------------------------


@dataclass
class Local:
    redis_port: int
    web: WebUnderTest
    mounts: dict[str, Path]  # container path -> directory here

    def path(self, value: str) -> str:
        for inside, here in self.mounts.items():
            if value == inside or value.startswith(inside + "/"):
                return str(here) + value[len(inside):]
        return value

    def env(self, env: dict[str, str]) -> dict[str, str]:
        ours = {k: self.path(v) for k, v in env.items()}
        parts = urlsplit(ours["CRAWLFLEET_REDIS_URL"])
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.redis_port}"
        ours["CRAWLFLEET_REDIS_URL"] = urlunsplit(parts._replace(netloc=netloc))
        ours["CRAWLFLEET_DNS_NAMESERVERS"] = self.web.dns
        ours["CRAWLFLEET_ALLOW_PRIVATE"] = "1"
        if ours.get("CRAWLFLEET_METRICS_PORT", "0") != "0":
            ours["CRAWLFLEET_METRICS_PORT"] = str(free_port())
        base = {k: v for k, v in os.environ.items() if not k.startswith("CRAWLFLEET_")}
        base["PATH"] = BIN + os.pathsep + base.get("PATH", "")
        return {**base, **ours}

    def argv(self, argv: list[str]) -> list[str]:
        web_ports = {"8080": str(self.web.port)}
        out = []
        for arg in argv:
            arg = self.path(arg)
            if arg.startswith("http://site"):
                parts = urlsplit(arg)
                port = web_ports.get(str(parts.port), str(parts.port))
                arg = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{port}"))
            out.append(arg)
        return out

    def redis_cli(self, command: str) -> str:
        # A probe's redis-cli speaks to the default 127.0.0.1:6379: never here.
        assert "redis-cli " in command and " -p " not in command, command
        return command.replace("redis-cli ", f"redis-cli -p {self.redis_port} ")


def redis_argv(argv: list[str], port: int, workdir: Path) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    assert argv[0] == "redis-server", argv
    assert "--port" not in argv and "--bind" not in argv, argv
    args = list(argv[1:])
    if "--dir" in args:  # the volume's path inside the container
        i = args.index("--dir")
        del args[i:i + 2]
    return [binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--daemonize", "no"]


def redis_ping(port: int, password: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = s.recv(64)
                if not chunk:
                    return False
                reply += chunk
            return reply == b"+OK\r\n+PONG\r\n"
    except OSError:
        return False


def start_web(compose: dict[str, Any]) -> WebUnderTest:
    """The compose testweb service's command, on free ports (conftest's start_testweb)."""
    argv = as_argv(compose["services"]["testweb"]["command"])
    assert argv[0] == "testweb" and "--bind" not in argv  # its default, 127.0.0.1
    return start_testweb(*web_args(argv))


# --------------------------------------------------------------------------------------------------
# Reading the results back
# --------------------------------------------------------------------------------------------------


def output_urls(output: Path, namespace: str) -> list[str]:
    urls = []
    for part in sorted((output / "results" / namespace).rglob("part-*.jsonl")):
        urls += [json.loads(line)["url"] for line in part.read_text().splitlines() if line]
    return urls


@dataclass
class Crawl:
    name: str
    tools_env: dict[str, str]  # where the files say to run status/check from
    output: Path
    namespace: str


def wait_all_written(crawls: list[Crawl], expected: list[str], procs: Processes) -> None:
    """Each crawl's sinks wrote every result (the last part waits up to
    CRAWLFLEET_OUTPUT_PART_SECONDS), and its status says finished. The parts are read until
    then: a `status` process every half second would take a core from the crawls."""

    def written() -> bool:
        procs.alive()
        return all(len(output_urls(c.output, c.namespace)) >= len(expected) for c in crawls)

    wait_for(written, timeout=75, what="the crawls' results in their outputs", every=0.5)

    def finished() -> bool:
        statuses = run_all({c.name: ([CRAWLFLEET, "status", "--json"], c.tools_env)
                            for c in crawls})
        for name, done in statuses.items():
            assert done.returncode == 0, f"{name}: status: {done.stderr}"
        return all(json.loads(done.stdout)["finished"] for done in statuses.values())

    wait_for(finished, timeout=20, what="the crawls to say finished", every=0.5)


# --------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    running = Processes(logdir)
    yield running
    running.kill_all()


def test_the_deployment_files_crawl_end_to_end(tmp_path: Path, procs: Processes) -> None:
    compose = files.compose()  # .env.example as .env
    services = compose["services"]
    web = start_web(compose)
    procs.running["testweb"] = web.process
    expected = web.reachable()
    seeds_text = "\n".join(web.seeds) + "\n"

    # --- compose: redis, the fleet, the demo ------------------------------------------------------
    c_port = free_port()
    c_output = tmp_path / "compose-output"
    c_seeds = tmp_path / "compose-seeds"
    c_seeds.mkdir()
    (c_seeds / "seeds.txt").write_text(seeds_text)
    compose_local = Local(c_port, web, {"/data/output": c_output, "/seeds": c_seeds})
    redis = services["redis"]
    password = files.env_example()["REDIS_PASSWORD"]
    (tmp_path / "compose-redis").mkdir()
    procs.spawn("compose-redis", redis_argv(as_argv(redis["command"]), c_port,
                                            tmp_path / "compose-redis"), dict(os.environ))
    wait_for(lambda: redis_ping(c_port, password), timeout=10, what="compose's redis")

    def compose_env(name: str) -> dict[str, str]:
        return compose_local.env(files.compose_service_env(services[name]))

    workers: dict[str, tuple[str, dict[str, str]]] = {}  # process -> (healthcheck, env)
    for name, service in services.items():
        if "build" not in service or name == "testweb":
            continue
        profiles = service.get("profiles") or []
        if profiles == ["tools"] or name == "demo-seed":
            continue  # one-shot, run below
        replicas = min((service.get("deploy") or {}).get("replicas", 1), MAX_REPLICAS)
        argv = compose_local.argv(as_argv(service["command"]))
        for i in range(replicas):
            process_name = f"compose-{name}-{i}"
            env = compose_env(name)
            procs.spawn(process_name, [CRAWLFLEET, *argv], env)
            if argv[0] == "worker":
                workers[process_name] = (shlex.join(as_argv(service["healthcheck"]["test"])),
                                         env)

    seeds = {name: ([CRAWLFLEET, *compose_local.argv(as_argv(services[name]["command"]))],
                    compose_env(name)) for name in ("seed", "demo-seed")}

    # --- Kubernetes: k8s/overlays/local, then k8s/seed --------------------------------------------
    objects = files.rendered("overlays/local")
    seed_objects = files.rendered("seed")
    secrets = files.rendered_secrets(objects)
    k_port = free_port()
    k_output = tmp_path / "k8s-output"
    k_seeds = tmp_path / "k8s-seeds"
    k_seeds.mkdir()
    (k_seeds / "seeds.txt").write_text(seeds_text)
    k8s_local = Local(k_port, web, {"/data/output": k_output, "/seeds": k_seeds})
    (redis_set,) = [o for o in objects if o["kind"] == "StatefulSet"]
    redis_container = pod_spec(redis_set)["containers"][0]  # type: ignore[index]
    redis_env = files.k8s_container_env(objects, redis_set, redis_container, pod_name="redis-0",
                                        secrets=secrets)
    redis_args = [files.expand_k8s(a, redis_env) for a in as_argv(redis_container["args"])]
    (tmp_path / "k8s-redis").mkdir()
    procs.spawn("k8s-redis", redis_argv(redis_args, k_port, tmp_path / "k8s-redis"),
                dict(os.environ))
    k_password = secrets["crawlfleet-redis"]["password"]
    wait_for(lambda: redis_ping(k_port, k_password), timeout=10, what="the k8s redis")

    k8s_probes: dict[str, tuple[list[str], dict[str, str]]] = {}
    http_probes: dict[str, tuple[str, int]] = {}  # pod -> (path, port)
    k_sink_env: dict[str, str] = {}
    for obj, container in crawlfleet_containers(objects):
        replicas = min(obj["spec"].get("replicas", 1), MAX_REPLICAS)
        for i in range(replicas):
            pod = f"{obj['metadata']['name']}-{i}"
            env = k8s_local.env(files.k8s_container_env(objects, obj, container, pod_name=pod,
                                                        secrets=secrets))
            argv = k8s_local.argv(as_argv(container["args"]))
            procs.spawn(f"k8s-{pod}", [CRAWLFLEET, *argv], env)
            if argv[0] == "worker":
                for kind in ("readinessProbe", "livenessProbe"):
                    k8s_probes[f"k8s-{pod} {kind}"] = (container[kind]["exec"]["command"], env)
            if "httpGet" in container.get("readinessProbe", {}):
                # The kubelet's GET, on the free port this process was given for its metrics.
                http_probes[f"k8s-{pod}"] = (container["readinessProbe"]["httpGet"]["path"],
                                            int(env["CRAWLFLEET_METRICS_PORT"]))
            if argv[0] == "sink":
                k_sink_env = env
    ((job, seed_container),) = list(crawlfleet_containers(seed_objects))
    seed_env = k8s_local.env(files.k8s_container_env(
        [*seed_objects, *objects], job, seed_container, pod_name="crawlfleet-seed-x",
        secrets=secrets))
    seeds["k8s seed job"] = ([CRAWLFLEET, *k8s_local.argv(as_argv(seed_container["args"]))],
                             seed_env)

    # --- Probes of the dependencies, as the files write them (with the seeds: two cores) ----------
    probes: dict[str, tuple[list[str], dict[str, str]]] = {}
    if shutil.which("redis-cli") is not None:
        redis_probes = [
            (as_argv(redis["healthcheck"]["test"])[1], compose_local,
             {k: str(v) for k, v in redis["environment"].items()}),
            (redis_container["readinessProbe"]["exec"]["command"][2], k8s_local, redis_env)]
        probes = {command: (["sh", "-c", local.redis_cli(command)], {**os.environ, **env})
                  for command, local, env in redis_probes}
    web_check = as_argv(services["testweb"]["healthcheck"]["test"])[1:]
    web_check[web_check.index("--port") + 1] = str(web.port)
    probes["testweb healthcheck"] = (web_check, compose_local.env(
        {"CRAWLFLEET_REDIS_URL": "redis://x"}))
    for name, done in run_all({**seeds, **probes}).items():
        assert done.returncode == 0, f"{name!r}: {done.stdout} {done.stderr}"
        if name in seeds:
            assert "refused 0" in done.stderr, f"{name}: {done.stderr}"

    # --- Every crawl ends with the reachable set in its output ------------------------------------
    tools = compose_env("seed")
    crawls = [Crawl("compose", tools, c_output, "crawlfleet"),
              Crawl("compose demo", {**tools, "CRAWLFLEET_NAMESPACE": "demo"}, c_output, "demo"),
              Crawl("k8s", k_sink_env, k_output, "crawlfleet")]
    wait_all_written(crawls, expected, procs)
    for crawl in crawls:
        urls = output_urls(crawl.output, crawl.namespace)
        assert sorted(set(urls)) == expected, f"{crawl.name}: not the reachable set"
        assert not [u for u, n in Counter(urls).items() if n > 1], f"{crawl.name}: duplicates"

    # --- check, and the workers' probes: 0 while alive, 1 once stopped ----------------------------
    pids = {name: procs.running[name].pid for name in workers}

    def worker_probes() -> dict[str, tuple[list[str], dict[str, str]]]:
        commands = dict(k8s_probes)
        for name, (test, env) in workers.items():
            command = shlex.split(test)
            if command[0] == "CMD-SHELL":
                # Inside its container the worker is PID 1; here it has its own pid.
                script = command[1].replace("}-1\"", f"}}-{pids[name]}\"")
                assert script != command[1], f"{name}: the healthcheck no longer names PID 1"
                commands[name] = (["sh", "-c", script], {**env, "HOSTNAME": socket.gethostname()})
            else:
                assert command[0] == "CMD", command
                commands[name] = (command[1:], env)
        return commands

    assert {name.split("-")[2] for name in http_probes} >= {"scheduler", "sink"}, http_probes
    for name, (path, port) in http_probes.items():
        wait_for(lambda p=path, n=port: http_ok(n, p), timeout=30,
                 what=f"{name}'s readiness probe (GET {path})")

    checks = {f"check {c.name}": ([CRAWLFLEET, "check"], c.tools_env) for c in crawls}
    for name, done in run_all({**checks, **worker_probes()}).items():
        if name in checks:
            assert done.returncode == 0 and "check: OK" in done.stdout, (
                f"{name}: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        else:
            assert done.returncode == 0, f"{name}: {done.stderr}"
    for name, code in procs.stop(*workers, *{p.split()[0] for p in k8s_probes}).items():
        assert code == 0, f"{name} exited with {code} on SIGTERM: {procs.log(name)}"
    for name, result in run_all(worker_probes()).items():
        assert result.returncode == 1, f"{name} still healthy after its worker stopped"
        assert "crawlfleet health: no health check from worker" in result.stderr, result.stderr

    # --- Everything else stops cleanly on SIGTERM -------------------------------------------------
    rest = [n for n in procs.running if not n.endswith("redis") and n != "testweb"]
    for name, code in procs.stop(*rest).items():
        assert code == 0, f"{name} exited with {code} on SIGTERM: {procs.log(name)}"


def http_ok(port: int, path: str) -> bool:
    """GET http://127.0.0.1:port/path answers 200, as the kubelet's httpGet probe asks."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
