"""Static checks of docker-compose.yml, its Redis-broker override, the Dockerfile and the nginx
config (Docker does not run here): the Compose specification's schema, commands that exist,
environment variables the settings read, healthchecks everywhere, proxy ports that line up."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from services.api import events
from services.api.auth import bind_refusal
from services.healthcheck import CHECKS
from shared.connections import redis_server_args
from shared.settings import load, setting_names
from tests.stack import compose
from tests.stack.compose import BASE, REDIS_BROKER, ROOT

DOCKERFILE = ROOT / "Dockerfile"
NGINX = ROOT / "deploy" / "nginx.conf"


@cache
def base() -> dict[str, Any]:
    return compose.load(BASE)


@cache
def redis_broker() -> dict[str, Any]:
    merged: dict[str, Any] = compose.merge(base(), compose.load(REDIS_BROKER))
    return merged


def variants() -> list[tuple[str, dict[str, Any]]]:
    """Each way the stack is started: (name, services docker compose up starts, interpolated
    with no variable set, so every ``${VAR:-default}`` takes its default)."""
    out = []
    for name, document in (("rabbitmq", base()), ("redis-broker", redis_broker())):
        services = compose.active_services(document, profiles=set())
        out.append((name, compose.interpolate(services, {})))
    return out


VARIANTS = [name for name, _ in variants()]


def ours(service: Mapping[str, Any]) -> bool:
    """Built from this repository's Dockerfile."""
    return "build" in service


def pollen_command(service: Mapping[str, Any]) -> str | None:
    """``pollen-api``/``pollen-collector``/``pollen-enabler`` when the service runs one."""
    command = service.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    return command[0] if command and command[0].startswith("pollen-") else None


def variant(name: str) -> dict[str, Any]:
    return dict(variants())[name]


# --- the Compose specification -----------------------------------------------------------------


def test_compose_files_follow_the_compose_specification() -> None:
    assert compose.schema_errors(compose.load(BASE)) == []
    assert compose.schema_errors(compose.load(REDIS_BROKER)) == []
    assert compose.schema_errors(redis_broker()) == []


def test_the_schema_check_rejects_what_compose_would() -> None:
    broken = copy.deepcopy(base())
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    broken["services"]["proxy"]["depends_on"]["api"]["condition"] = "service_ready"
    errors = compose.schema_errors(broken)
    assert any("services/api" in e and "helthcheck" in e for e in errors), errors
    assert any(e.startswith("services/proxy/depends_on") for e in errors), errors


def test_the_redis_broker_override_drops_rabbitmq() -> None:
    services = variant("redis-broker")
    assert "rabbitmq" not in services
    assert "rabbitmq" in variant("rabbitmq")
    for name, service in services.items():
        broker = compose.environment(service).get("POLLEN_BROKER_URL")
        assert broker is None or broker.startswith("redis://"), (name, broker)
        assert not compose.environment(service).get("POLLEN_BROKER_API"), name


@pytest.mark.parametrize("name", VARIANTS)
def test_dependencies_are_services_that_start(name: str) -> None:
    services = variant(name)
    for service_name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name}: {service_name} depends on {dependency}"


# --- the topology the issue asks for -----------------------------------------------------------


def replicas(service: Mapping[str, Any]) -> int:
    return int(service.get("deploy", {}).get("replicas", service.get("scale", 1)))


@pytest.mark.parametrize("name", VARIANTS)
def test_topology(name: str) -> None:
    services = variant(name)
    by_command: dict[str, list[int]] = {}
    for service in services.values():
        command = pollen_command(service)
        if command:
            by_command.setdefault(command, []).append(replicas(service))
    for command in ("pollen-collector", "pollen-enabler", "pollen-api"):
        assert sum(by_command.get(command, [])) >= 2, f"{name}: two {command} at least"
    assert "redis" in services
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert " ".join(redis_server_args()) in redis_command, "Pollen's recommended Redis config"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"]), "AOF on a volume"
    assert {"worker", "traffic", "proxy"} <= set(services)
    if name == "rabbitmq":
        collectors = [s for s in services.values() if pollen_command(s) == "pollen-collector"]
        queues = {compose.environment(s).get("POLLEN_EVENT_QUEUE") for s in collectors}
        assert len(queues) == 1 and queues != {""} and queues != {None}, "one named queue"


@pytest.mark.parametrize("name", VARIANTS)
def test_everything_uses_one_broker_and_one_redis(name: str) -> None:
    services = variant(name)
    brokers = {
        compose.environment(s)["POLLEN_BROKER_URL"]
        for s in services.values()
        if "POLLEN_BROKER_URL" in compose.environment(s)
    }
    assert len(brokers) == 1, brokers
    stores = {
        compose.environment(s)["POLLEN_REDIS_URL"] for s in services.values() if pollen_command(s)
    }
    assert len(stores) == 1, stores
    worker_backend = compose.environment(services["worker"]).get("DEMO_RESULT_BACKEND")
    api_backend = compose.environment(services["api"]).get("POLLEN_RESULT_BACKEND")
    assert worker_backend == api_backend


@pytest.mark.parametrize("name", VARIANTS)
def test_every_service_has_a_healthcheck(name: str) -> None:
    for service_name, service in variant(name).items():
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: {service_name}"
        assert not service["healthcheck"].get("disable"), service_name


def test_other_images_are_pinned() -> None:
    for name, service in base()["services"].items():
        if not ours(service):
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), (name, image)


# --- commands and entry points -----------------------------------------------------------------


@cache
def console_scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert isinstance(scripts, dict)
    return scripts


@cache
def accepted_options(*args: str) -> frozenset[str]:
    """The ``--options`` that ``python *args --help`` lists."""
    out = subprocess.run(
        [sys.executable, *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, f"{args} --help: {out.stderr}"
    return frozenset(re.findall(r"--[A-Za-z][\w-]*", out.stdout))


def options_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def check_command(argv: list[str], where: str) -> None:
    """Fail unless ``argv`` runs something this package (or its dependencies) provides, with
    options it accepts."""
    program, args = argv[0], argv[1:]
    if program.startswith("pollen-"):
        assert program in console_scripts(), f"{where}: {program} is not in [project.scripts]"
        module, _, function = console_scripts()[program].partition(":")
        assert callable(getattr(importlib.import_module(module), function)), where
        assert args == [], f"{where}: {program} takes no arguments (settings are env vars)"
    elif program == "python":
        assert args[0] == "-m", where
        module, rest = args[1], args[2:]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{where}: no module {module}"
        if spec.submodule_search_locations is not None:  # a package: needs a __main__
            assert importlib.util.find_spec(f"{module}.__main__"), f"{where}: {module}"
        if module == "services.healthcheck":
            assert rest and rest[0] in CHECKS, f"{where}: {rest}"
        else:
            for option in options_of(rest):
                assert option in accepted_options("-m", module), f"{where}: {module} {option}"
    elif program == "celery":
        assert args[0] == "-A", where
        app_module, subcommand = args[1], args[2:]
        app = importlib.import_module(app_module).app
        assert app.main, f"{where}: {app_module} has no Celery app"
        words = list(itertools.takewhile(lambda a: not a.startswith("-"), subcommand))
        accepted = accepted_options("-m", "celery", "-A", app_module, *words)
        for option in options_of(subcommand):
            assert option in accepted, f"{where}: celery {' '.join(words)} {option}"
    else:
        pytest.fail(f"{where}: unknown program {program!r}")


def argv_of(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def healthcheck_argv(test: list[str]) -> list[str]:
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    return test[1:]


@pytest.mark.parametrize("name", VARIANTS)
def test_commands_and_healthchecks_exist_in_the_package(name: str) -> None:
    for service_name, service in variant(name).items():
        if not ours(service):
            continue
        assert "command" in service, f"{service_name}: say what it runs"
        check_command(argv_of(service["command"]), f"{service_name} command")
        check_command(healthcheck_argv(service["healthcheck"]["test"]), f"{service_name} health")


def test_dockerfile_copies_what_exists_and_runs_a_console_script() -> None:
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", text, re.M)
    assert copies, "the Dockerfile copies the sources"
    for sources in copies:
        for source in sources.split():
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
    # every package setuptools installs is copied
    with (ROOT / "pyproject.toml").open("rb") as f:
        includes = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {s for sources in copies for s in sources.split()}
    for pattern in includes:
        assert pattern.rstrip("*") in copied, f"{pattern} is installed but not copied"
    cmd = re.findall(r"^CMD\s+(\[.*\])\s*$", text, re.M)
    assert len(cmd) == 1, "one exec-form CMD"
    check_command(json.loads(cmd[0]), "Dockerfile CMD")
    assert "ENTRYPOINT" not in text or "ENTRYPOINT" in text.split("CMD")[0]
    for entrypoint in re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M):
        check_command(json.loads(entrypoint), "Dockerfile ENTRYPOINT")
    image = {s.get("image") for s in base()["services"].values() if ours(s)}
    assert len(image) == 1, "every built service shares one image"


def test_a_bad_command_is_caught() -> None:
    for argv in (
        ["pollen-collecter"],
        ["python", "-m", "services.nothing"],
        ["python", "-m", "demo.traffic", "--rat", "5"],
        ["python", "-m", "services.healthcheck", "worker"],
        ["celery", "-A", "demo.app", "worker", "--concurency", "4"],
    ):
        with pytest.raises(AssertionError):
            check_command(argv, "test")


# --- environment -------------------------------------------------------------------------------


def demo_variables() -> set[str]:
    """``DEMO_*`` variables the demo reads."""
    source = "".join(p.read_text() for p in (ROOT / "demo").glob("*.py"))
    return set(re.findall(r"""["'](DEMO_[A-Z_]+)["']""", source))


def test_every_variable_is_one_the_settings_read() -> None:
    names = set(setting_names())
    assert names, "shared.settings lists its variables"
    documents = {"docker-compose.yml": compose.load(BASE)}
    documents["docker-compose.redis-broker.yml"] = compose.load(REDIS_BROKER)
    for file_name, document in documents.items():
        for service_name, service in document["services"].items():
            for key in compose.environment(service):
                where = f"{file_name}: {service_name}: {key}"
                if key.startswith("POLLEN_"):
                    assert key in names, f"{where} is not a setting"
                elif key.startswith("DEMO_"):
                    assert key in demo_variables(), f"{where} is not read by the demo"
                else:
                    assert not ours(service), f"{where}: neither a setting nor the demo's"
        interpolated = compose.variables(document)
        unknown = {v for v in interpolated if v.startswith("POLLEN_")} - names
        assert not unknown, f"{file_name} interpolates {unknown}, which are not settings"
    for key in re.findall(r"\b(POLLEN_[A-Z_]+)=", DOCKERFILE.read_text()):
        assert key in names, f"Dockerfile: {key}"


@pytest.mark.parametrize("name", VARIANTS)
def test_each_service_settings_load(name: str) -> None:
    """The settings every Pollen service gets are valid, and the API may bind its address."""
    for service_name, service in variant(name).items():
        if not pollen_command(service):
            continue
        settings = load(compose.environment(service))
        if pollen_command(service) == "pollen-api":
            assert bind_refusal(settings) is None, service_name


# --- the proxy ---------------------------------------------------------------------------------


def nginx() -> str:
    return re.sub(r"#.*", "", NGINX.read_text())


def proxy_service(services: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    found = [
        (name, s)
        for name, s in services.items()
        if any(str(v).endswith("/etc/nginx/conf.d/default.conf:ro") for v in s.get("volumes", []))
    ]
    assert len(found) == 1, "one service mounts deploy/nginx.conf"
    return found[0]


def ws_locations(text: str) -> list[tuple[str, str]]:
    """(regex, body) of each ``location ~ regex { ... }``."""
    return re.findall(r"location\s+~\*?\s+(\S+)\s*\{([^}]*)\}", text)


@pytest.mark.parametrize("name", VARIANTS)
def test_proxy_ports_line_up(name: str) -> None:
    services = variant(name)
    text = nginx()
    listen = re.findall(r"^\s*listen\s+(\d+)\s*;", text, re.M)
    assert len(listen) == 1
    upstreams = re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", text)
    assert len(upstreams) == 1
    upstream_name, body = upstreams[0]
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", body, re.M)
    assert servers, "the upstream lists the API replicas"
    apis = {n: s for n, s in services.items() if pollen_command(s) == "pollen-api"}
    assert {host for host, _ in servers} == set(apis), "every API service, and only those"
    for host, port in servers:
        assert compose.environment(apis[host])["POLLEN_API_PORT"] == port, host
    assert re.findall(r"proxy_pass\s+http://(\w+)\s*;", text) == [upstream_name] * 2

    _, proxy = proxy_service(services)
    source = proxy["volumes"][0].split(":")[0]
    assert (ROOT / source).resolve() == NGINX
    published = [str(p).rsplit(":", 1)[-1] for p in proxy["ports"]]
    assert published == listen, "the proxy publishes the port nginx listens on"
    health = " ".join(proxy["healthcheck"]["test"])
    assert f"127.0.0.1:{listen[0]}/healthz" in health
    assert set(proxy["depends_on"]) == set(apis)


def test_the_proxy_passes_websockets_through() -> None:
    text = nginx()
    assert re.search(r"^\s*proxy_http_version\s+1\.1\s*;", text, re.M)
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade", text)
    locations = ws_locations(text)
    assert locations
    paths = []
    for route in events.routes:
        path = str(getattr(route, "path", ""))
        paths.append(re.sub(r"\{[^}]+\}", "task-succeeded", path))
    assert "/api/events" in paths
    for path in paths:
        matching = [body for regex, body in locations if re.search(regex, path)]
        assert matching, f"no WebSocket location for {path}"
        body = matching[0]
        assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade\s*;", body), path
        assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade\s*;", body)
        assert "proxy_pass" in body
    for plain_path in ("/api/tasks", "/api/workers", "/metrics", "/readyz"):
        assert not any(re.search(regex, plain_path) for regex, _ in locations), plain_path


def test_nginx_conf_path_is_the_mounted_one() -> None:
    assert NGINX.is_file()
    assert Path(proxy_service(base()["services"])[1]["volumes"][0].split(":")[0]) == Path(
        "./deploy/nginx.conf"
    )


def test_the_image_gets_every_file_the_packages_need() -> None:
    """``pip install .`` (the Dockerfile's) installs .py files and declared package data only:
    every other file in the packages must be declared, or the image lacks it."""
    import fnmatch

    from setuptools import find_packages

    with (ROOT / "pyproject.toml").open("rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    package_data: dict[str, list[str]] = tool.get("package-data", {})
    packages = find_packages(str(ROOT), include=tool["packages"]["find"]["include"])
    assert {"services.api", "shared", "demo"} <= set(packages)
    missing = []
    for package in packages:
        directory = ROOT / package.replace(".", "/")
        patterns = package_data.get(package, []) + package_data.get("*", [])
        for path in directory.iterdir():
            if path.is_dir():
                if path.name == "__pycache__" or (path / "__init__.py").exists():
                    continue
                files = [p for p in path.rglob("*") if p.is_file()]
            else:
                files = [path]
            for file in files:
                relative = file.relative_to(directory).as_posix()
                if file.suffix in (".py", ".pyc", ".pyi") and "/" not in relative:
                    continue
                if not any(fnmatch.fnmatch(relative, p) for p in patterns):
                    missing.append(f"{package}: {relative}")
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
