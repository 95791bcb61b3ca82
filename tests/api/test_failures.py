"""Failures by exception class, end to end: a real worker (demo.app) fails tasks with several
exception classes and retries others; the real collector indexes them; the API groups them
(``/api/failures``), pages each class's tasks (``/api/tasks?exception=``, the export too) and
counts them in ``/metrics``. Flower's EventsState, listening to the same broker, is the source
of each task's exception text."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from celery import Celery

from tests.api.test_end_to_end import FlowerRecorder
from tests.support.api import Api
from tests.support.servers import (
    Process,
    RedisServer,
    celery_worker,
    pollen_env,
    service,
    wait_for,
)

WORKER = "fx@pollen-test"
#: (task, args, how many): each fails with a known class, or retries twice then succeeds
PLAN: list[tuple[str, tuple[Any, ...], int]] = [
    ("demo.app.fail", ("plain",), 2),  # ValueError
    ("demo.app.fail_as", ("KeyError", "k"), 3),
    ("demo.app.fail_as", ("ZeroDivisionError", "z"), 2),
    ("demo.app.fail_as", ("DemoError", "d"), 1),
    ("demo.app.flaky", (), 2),  # RuntimeError twice each, then SUCCESS
    ("demo.app.add", (1, 2), 3),  # no failure
]
EXPECTED = {  # class -> (failed events, retried events, task name)
    "ValueError": (2, 0, "demo.app.fail"),
    "KeyError": (3, 0, "demo.app.fail_as"),
    "ZeroDivisionError": (2, 0, "demo.app.fail_as"),
    "DemoError": (1, 0, "demo.app.fail_as"),
    "RuntimeError": (0, 4, "demo.app.flaky"),
}


class Run:
    def __init__(self, api: Api, capped: Api, ids: dict[str, set[str]], flower: Any) -> None:
        self.api, self.capped, self.ids, self.flower = api, capped, ids, flower


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("failures")
    server = RedisServer(workdir / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    env = pollen_env(broker, f"redis://127.0.0.1:{server.port}/1", "fx")
    recorder = FlowerRecorder(broker)
    procs: list[Process] = []
    apis: list[Api] = []
    app = Celery(broker=broker)
    try:
        procs.append(service("collector", env, workdir / "collector.log"))
        procs.append(celery_worker(broker, workdir / "worker.log", WORKER))
        apis.append(Api(env, workdir / "api.log"))
        apis.append(Api(env, workdir / "api-capped.log", POLLEN_METRICS_EXCEPTION_LABELS="2"))
        api = apis[0]
        wait_for(lambda: api.data("/api/workers").get(WORKER), timeout=60, message="worker up")
        ids: dict[str, set[str]] = {}

        def finished() -> bool:
            tasks = api.data("/api/tasks?limit=1000")
            every = set().union(*ids.values())
            return all(tasks.get(u, {}).get("state") in ("SUCCESS", "FAILURE") for u in every)

        # the first two classes finish before the others start: they are the ones seen first
        for part in (PLAN[:2], PLAN[2:]):
            for name, args, count in part:
                for _ in range(count):
                    ids.setdefault(name + repr(args), set()).add(app.send_task(name, args).id)
            wait_for(finished, timeout=60, message="every task finished")
        yield Run(api, apis[1], ids, recorder)
    finally:
        app.close()
        recorder.close()
        for a in apis:
            a.stop()
        for p in procs:
            p.stop()
        server.stop()


def classes(api: Api) -> dict[str, dict[str, Any]]:
    return {c["exception"]: c for c in api.data("/api/failures?minutes=30")["classes"]}


def test_failures_grouped_by_class(run: Run) -> None:
    got = classes(run.api)
    assert set(got) == set(EXPECTED)
    for name, (failed, retried, task) in EXPECTED.items():
        c = got[name]
        assert (c["failed"], c["retried"], c["count"]) == (failed, retried, failed + retried)
        assert c["task_names"] == {task: failed + retried}
        assert c["workers"] == {WORKER: failed + retried}
        assert c["first_seen"] <= c["last_seen"]
        assert len(c["per_minute"]) == 30 and sum(c["per_minute"]) == failed + retried
    assert got["KeyError"]["tasks_kept"] == 3 and got["RuntimeError"]["tasks_kept"] == 2
    # latest first
    order = [c["exception"] for c in run.api.data("/api/failures")["classes"]]
    assert order == sorted(order, key=lambda n: -got[n]["last_seen"])


def test_each_class_pages_its_tasks(run: Run) -> None:
    flower = dict(run.flower.tasks())
    expected = {
        "KeyError": run.ids["demo.app.fail_as('KeyError', 'k')"],
        "DemoError": run.ids["demo.app.fail_as('DemoError', 'd')"],
        "RuntimeError": run.ids["demo.app.flaky()"],
        "ValueError": run.ids["demo.app.fail('plain',)"],
    }
    for name, ids in expected.items():
        for query in ("", "&sort_by=received", "&sort_by=-name", "&limit=1"):
            listed = run.api.json(f"/api/tasks?exception={name}{query}")
            if query == "&limit=1":
                assert len(listed) == 1 and listed[0][0] in ids
                continue
            assert {u for u, _ in listed} == ids, (name, query)
        for uuid in ids:
            # the class as celery's worker wrote the exception (Flower's view of the task); a
            # retry's exception is celery's Retry(message, cause, when)
            text = flower[uuid]["exception"]
            assert text.startswith((f"{name}(", f"Retry(Retry(...), {name}(")), text
        _, _, body = run.api.get(f"/api/tasks/export?exception={name}")
        assert {json.loads(line)["uuid"] for line in body.splitlines()} == ids
    # with other filters: the flaky tasks succeeded in the end
    assert run.api.json("/api/tasks?exception=RuntimeError&state=FAILURE") == []
    succeeded = run.api.json("/api/tasks?exception=RuntimeError&state=SUCCESS")
    assert {u for u, _ in succeeded} == expected["RuntimeError"]
    assert run.api.json("/api/tasks?exception=NoSuchError") == []
    assert run.api.json("/api/tasks?exception=keyerror") == []  # a class is exact


def failure_samples(api: Api) -> Counter[tuple[str, str, str, str]]:
    _, _, body = api.get("/metrics")
    out: Counter[tuple[str, str, str, str]] = Counter()
    for line in body.decode().splitlines():
        if line.startswith("pollen_task_failures_total{"):
            labels = dict(
                part.split("=", 1)
                for part in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            key = tuple(labels[k].strip('"') for k in ("worker", "type", "task", "exception"))
            out[key] += int(float(line.rsplit(" ", 1)[1]))  # type: ignore[index]
    return out


def test_metric_by_class_with_bounded_labels(run: Run) -> None:
    samples = failure_samples(run.api)
    expected: Counter[tuple[str, str, str, str]] = Counter()
    for name, (failed, retried, task) in EXPECTED.items():
        if failed:
            expected[(WORKER, "task-failed", task, name)] += failed
        if retried:
            expected[(WORKER, "task-retried", task, name)] += retried
    assert samples == expected
    # two labels: the two classes seen first keep theirs, the rest count under "other"
    capped = failure_samples(run.capped)
    assert {k[3] for k in capped} == {"ValueError", "KeyError", "other"}
    assert sum(capped.values()) == sum(expected.values())
    assert capped[(WORKER, "task-failed", "demo.app.fail_as", "other")] == 3  # Zero..., Demo...


def test_bad_minutes_is_400(run: Run) -> None:
    for value in ("0", "1441", "x"):
        status, _, body = run.api.get(f"/api/failures?minutes={value}")
        assert status == 400 and json.loads(body)["error"].startswith("minutes: ")


def test_exception_and_traceback_search_terms(run: Run) -> None:
    def found(search: str) -> set[str]:
        return {u for u, _ in run.api.json(f"/api/tasks?limit=1000&search={search}")}

    key_errors = run.ids["demo.app.fail_as('KeyError', 'k')"]
    fail_as = set().union(*(ids for plan, ids in run.ids.items() if "fail_as" in plan))
    assert found("exception:keyerror") == key_errors
    assert (
        found("exception:KeyError%20OR%20exception:demoerror")
        == key_errors | (run.ids["demo.app.fail_as('DemoError', 'd')"])
    )
    # a retry's exception is celery's Retry(...) with the cause inside
    assert found("exception:runtimeerror") == run.ids["demo.app.flaky()"]
    # tracebacks hold newlines (JSON escapes): Python decides those, as Flower's rules would
    assert found("traceback:fail_as") == fail_as
    assert found("traceback:fail_as%20state:failure") == fail_as
    # a term without a field searches Flower's fields only: the raising line is in the
    # traceback, in no task's name, args or result
    assert found(quote("traceback:FAILURES[kind]")) == fail_as
    assert found(quote("FAILURES[kind]")) == set()
