"""Settings: defaults, validation naming the variable, and a service refusing to start."""

from __future__ import annotations

import subprocess

import pytest

from shared.settings import SettingsError, load, setting_names
from tests.support.servers import PYTHON, ROOT


def test_defaults() -> None:
    s = load({})
    assert s.broker_url == "" and s.celery_app == ""  # the app's broker, else Redis on 6379/0
    assert s.redis_url == "redis://127.0.0.1:6379/1"
    assert s.namespace == "pollen" and s.shards == 1


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"POLLEN_SHARDS": "0"}, "POLLEN_SHARDS"),
        ({"POLLEN_SHARDS": "many"}, "POLLEN_SHARDS"),
        ({"POLLEN_NAMESPACE": "has space"}, "POLLEN_NAMESPACE"),
        ({"POLLEN_BATCH_INTERVAL": "-1"}, "POLLEN_BATCH_INTERVAL"),
        ({"POLLEN_READ_ONLY": "perhaps"}, "POLLEN_READ_ONLY"),
        ({"POLLEN_LOG_LEVEL": "LOUD"}, "POLLEN_LOG_LEVEL"),
        ({"POLLEN_BROKER_TRANSPORT_OPTIONS": "{master_name"}, "POLLEN_BROKER_TRANSPORT_OPTIONS"),
        ({"POLLEN_BROKER_TRANSPORT_OPTIONS": "[1]"}, "POLLEN_BROKER_TRANSPORT_OPTIONS"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load(env)


@pytest.mark.parametrize(
    ("word", "value"),
    [("yes", True), ("on", True), ("1", True), ("no", False), ("off", False), ("false", False)],
)
def test_boolean_words(word: str, value: bool) -> None:
    assert load({"POLLEN_READ_ONLY": word}).read_only is value


def test_every_variable_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in setting_names() if f"`{name}`" not in readme]
    assert not missing, f"README lacks {missing}"


@pytest.mark.parametrize("service", ["collector", "api", "enabler"])
def test_service_refuses_a_bad_setting(service: str) -> None:
    out = subprocess.run(
        [PYTHON, "-m", f"services.{service}"],
        env={"POLLEN_SHARDS": "zero"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "POLLEN_SHARDS" in out.stderr


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    from shared.settings import markdown_table

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- settings:begin -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert block == markdown_table(), "run `python -m shared.settings` and paste the table"
