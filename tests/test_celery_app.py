"""How the Celery app every service uses is made (``shared.broker.load_app``): the user's
app through ``POLLEN_CELERY_APP``/``-A``, explicit settings winning, Pollen's fail-fast
timeouts laid over it, and a bad app stopping a service with a message naming the variable.
Nothing here connects to a broker; tests/deploy runs the same apps against real ones."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.broker import DEFAULT_BROKER_URL, event_exchange, load_app, shown_url, transport
from shared.settings import SettingsError, load, mask_url, parse_sentinel
from tests.support.servers import PYTHON


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user's module (a fresh name per test, so no import is cached) in the current
    directory, as `celery -A` finds it."""
    name = f"proj_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from celery import Celery\n"
        f"app = Celery({name!r}, broker='amqp://u:secret@rabbit:5671/prod')\n"
        "app.conf.update(event_exchange='acme.ev', control_exchange='acme.ctl',\n"
        "    result_backend='redis://results:6379/2',\n"
        "    broker_transport_options={'visibility_timeout': 99, 'max_retries': 50})\n"
    )
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_the_users_app_gives_broker_exchanges_and_backend(project: str) -> None:
    app = load_app(load({"POLLEN_CELERY_APP": project}), "pollen-test")
    assert app.main == project  # the user's own app object, not a copy
    assert transport(app) == "amqp"
    assert event_exchange(app) == "acme.ev" and app.conf.control_exchange == "acme.ctl"
    assert app.conf.result_backend == "redis://results:6379/2"
    assert shown_url(app) == "amqp://u:***@rabbit:5671/prod"
    options = app.conf.broker_transport_options
    # the user's options are kept; the retry budget is Pollen's, so an outage fails fast
    assert options["visibility_timeout"] == 99 and options["max_retries"] == 1
    assert app.conf.broker_connection_timeout == 2 and app.conf.broker_connection_retry is False


def test_explicit_settings_win_over_the_app(project: str) -> None:
    settings = load(
        {
            "POLLEN_CELERY_APP": f"{project}:app",
            "POLLEN_BROKER_URL": "redis://other:6379/3",
            "POLLEN_RESULT_BACKEND": "redis://other:6379/4",
            "POLLEN_BROKER_TRANSPORT_OPTIONS": '{"global_keyprefix": "p:"}',
        }
    )
    app = load_app(settings, "pollen-test")
    assert transport(app) == "redis"
    assert app.conf.broker_url == "redis://other:6379/3"
    assert app.conf.result_backend == "redis://other:6379/4"
    options = app.conf.broker_transport_options
    assert options["global_keyprefix"] == "p:" and options["visibility_timeout"] == 99
    assert event_exchange(app) == "acme.ev"  # what the settings do not name stays the app's


def test_without_an_app_the_default_broker_is_local_redis() -> None:
    app = load_app(load({}), "pollen-test")
    assert app.conf.broker_url == DEFAULT_BROKER_URL and event_exchange(app) == "celeryev"


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("no_such_module_here", "cannot load"),
        ("json:dumps", "not a Celery app"),
        ("json:nothing", "cannot load"),
    ],
)
def test_a_bad_app_names_the_variable(spec: str, why: str) -> None:
    with pytest.raises(SettingsError, match=f"POLLEN_CELERY_APP='{spec}': .*{why}"):
        load_app(load({"POLLEN_CELERY_APP": spec}), "pollen-test")


@pytest.mark.parametrize("script", ["pollen-collector", "pollen-api", "pollen-enabler"])
def test_console_scripts_take_dash_a_and_refuse_a_bad_app(script: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(Path(PYTHON).parent / script), "-A", "no_such_proj.celery:app"],
        env={"PATH": "/usr/bin:/bin", "POLLEN_CELERY_APP": "ignored_for_dash_a"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out
    assert "POLLEN_CELERY_APP='no_such_proj.celery:app'" in out.stderr, out.stderr
    helped = subprocess.run(
        [str(Path(PYTHON).parent / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "--app" in helped.stdout


def test_sentinel_urls() -> None:
    s = parse_sentinel(
        "redis+sentinel://user:pw@s1:26379,s2:26380/mymaster/3"
        "?sentinel_password=sp&ssl_ca_certs=/ca.pem"
    )
    assert s is not None
    assert s.hosts == [("s1", 26379), ("s2", 26380)] and s.service == "mymaster" and s.db == 3
    assert (s.username, s.password, s.sentinel_password) == ("user", "pw", "sp")
    assert s.query == "ssl_ca_certs=%2Fca.pem" and not s.ssl
    tls = parse_sentinel("rediss+sentinel://s1:26379/mymaster")
    assert tls is not None and tls.ssl and tls.db == 0
    assert parse_sentinel("redis://localhost/1") is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1/mymaster/0",  # no port
        "redis+sentinel://s1:26379/",  # no master name
        "redis+sentinel://s1:26379/mymaster/zero",
        "http://localhost/1",  # not a Redis scheme
    ],
)
def test_bad_redis_urls_name_the_variable(url: str) -> None:
    with pytest.raises(SettingsError, match="POLLEN_REDIS_URL"):
        load({"POLLEN_REDIS_URL": url})


def test_urls_are_masked_for_logs_whatever_their_form() -> None:
    """Failover lists and several Sentinel hosts, which no URL parser takes, are shown masked
    (kombu's sanitizer raises on them, and the services log them at start)."""
    assert mask_url("sentinel://:pw@s1:26379;sentinel://u:pw2@s2:26379") == (
        "sentinel://:***@s1:26379;sentinel://u:***@s2:26379"
    )
    assert mask_url("redis+sentinel://:pw@s1:1,s2:2/m/1?sentinel_password=sp&x=1") == (
        "redis+sentinel://:***@s1:1,s2:2/m/1?sentinel_password=***&x=1"
    )
    assert mask_url("redis://localhost:6379/1") == "redis://localhost:6379/1"


def test_sentinel_passwords_never_show_in_errors() -> None:
    with pytest.raises(SettingsError) as info:
        load({"POLLEN_REDIS_URL": "redis+sentinel://:hunter2@s1/m?sentinel_password=hunter3"})
    assert "hunter2" not in str(info.value) and "hunter3" not in str(info.value)
