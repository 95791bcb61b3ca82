"""``deploy/kubernetes/pollen.yaml`` checked against the code (no cluster runs here): every
variable is a setting and the settings load, commands are the package's console scripts with
``-A``, probes hit real routes and real health checks, selectors and ports line up, and
nothing runs as root. tests/deploy runs the same commands against real brokers."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from ruamel.yaml import YAML

from services.api.app import make_app
from services.healthcheck import CHECKS
from shared.settings import load, setting_names
from tests.support.servers import ROOT

MANIFEST = ROOT / "deploy" / "kubernetes" / "pollen.yaml"


def documents() -> list[dict[str, Any]]:
    # the project's one YAML parser (tests/stack/compose.py uses it too)
    return [d for d in YAML(typ="safe", pure=True).load_all(MANIFEST.read_text()) if d]


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == "Deployment"}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def config() -> dict[str, str]:
    (found,) = (d for d in documents() if d["kind"] == "ConfigMap")
    return dict(found["data"])


def test_every_variable_is_a_setting() -> None:
    known = set(setting_names())
    names = set(config())
    for deployment in deployments().values():
        names |= {e["name"] for e in container(deployment).get("env", [])}
    assert names and names <= known, names - known


@pytest.mark.parametrize("name", ["pollen-collector", "pollen-enabler", "pollen-api"])
def test_each_service_settings_load(name: str) -> None:
    env = {
        **config(),
        **{e["name"]: e["value"] for e in container(deployments()[name]).get("env", [])},
    }
    env.pop("POLLEN_CELERY_APP")  # the user's module; tests/deploy load real ones
    settings = load({**env, "POLLEN_API_TOKENS": "a-secret-token"})  # the Secret's
    assert settings.redis_sentinel is not None and settings.redis_wait_replicas == 1


def test_commands_are_console_scripts_given_the_app() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, deployment in deployments().items():
        command = container(deployment)["command"]
        assert command[0] == name and name in scripts, command
        assert command[1:] == ["-A", "proj"], command


def test_probes_are_real_checks_and_routes() -> None:
    settings = load({})
    app = make_app(settings)
    paths = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    for name, deployment in deployments().items():
        c = container(deployment)
        for probe in ("livenessProbe", "readinessProbe"):
            if probe not in c:
                continue
            if "exec" in c[probe]:
                command = c[probe]["exec"]["command"]
                assert command[:3] == ["python", "-m", "services.healthcheck"], command
                assert command[3] in CHECKS and name.endswith(command[3])
            else:
                assert c[probe]["httpGet"]["path"] in paths
        assert "livenessProbe" in c, name


def test_selectors_ports_and_users_line_up() -> None:
    for deployment in deployments().values():
        spec = deployment["spec"]
        assert (
            spec["selector"]["matchLabels"].items()
            <= spec["template"]["metadata"]["labels"].items()
        )
        assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    (service,) = (d for d in documents() if d["kind"] == "Service")
    api = deployments()["pollen-api"]
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    port = {e["name"]: e["value"] for e in container(api)["env"]}["POLLEN_API_PORT"]
    assert [p["containerPort"] for p in container(api)["ports"]] == [int(port)]
    assert {e["name"]: e["value"] for e in container(api)["env"]}["POLLEN_API_HOST"] == "0.0.0.0"
    assert any("secretRef" in source for source in container(api)["envFrom"])
