"""The dashboard in a real headless Chromium against a real stack (see conftest.py).

Each test opens the page the way a person does and waits (with timeouts) for what they would
see; the only timing promise checked is the issue's "a finishing task shows up within a
second". Screenshots of each view are written to .run/screenshots/
(`make screenshots` refreshes docs/screenshots/).
"""

from __future__ import annotations

import csv
import json
import re
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import redis
from playwright.sync_api import expect

from services.collector.writer import Writer
from shared.keys import Keys
from shared.settings import load
from tests.dashboard.conftest import IDLE_QUEUE, NAMESPACE, WORKER, Stack, screenshot
from tests.support import readback
from tests.support.api import Api
from tests.support.replies import entries
from tests.support.servers import PYTHON, Process, wait_for

ROW = "#tasks tbody tr[data-uuid]"


def no_errors(page: Any, *expected: str) -> None:
    """No console errors but the ``expected`` ones (substrings), e.g. a 400 the test caused."""
    errors = [e for e in page.console.errors if not any(x in e for x in expected)]
    assert errors == [], errors


def open_view(page: Any, base: str, hash_: str) -> None:
    page.goto(f"{base}/{hash_}")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=10_000)


def test_workers_view(page: Any, stack: Stack) -> None:
    open_view(page, stack.api.url, "")
    row = page.locator(f'#workers tr[data-worker="{WORKER}"]')
    expect(row.locator("[data-status]")).to_have_attribute("data-status", "online")
    expect(row.locator("td.ev-task-succeeded")).not_to_have_text("0")
    expect(row).to_contain_text("prefork")  # pool, from the enabler's inspect data
    expect(page.locator("#summary")).to_contain_text("1 of 1 worker online")
    screenshot(page, "workers")

    row.get_by_role("link", name=WORKER).click()
    expect(page.locator("#registered")).to_contain_text("demo.app.add")
    expect(page.locator("#worker-queues")).to_contain_text("celery")
    expect(page.locator("#pool-grow")).to_be_visible()
    screenshot(page, "worker")

    # a control action goes through a confirmation: cancel sends nothing, confirm sends it
    page.locator("#pool-grow").click()
    expect(page.locator("#confirm")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text(WORKER)
    page.locator("#confirm button[value=cancel]").click()
    expect(page.locator("#confirm")).to_be_hidden()
    expect(page.locator(".toast")).to_have_count(0)
    page.locator("#pool-grow").click()
    page.locator("#confirm-ok").click()
    expect(page.locator(".toast-ok")).to_contain_text("grow", ignore_case=True)
    no_errors(page)


def test_tasks_filters_search_and_columns(page: Any, stack: Stack) -> None:
    needle = f"needle-{uuid.uuid4().hex[:10]}"
    marked = stack.send("demo.app.fail", needle)
    wait_for(
        lambda: (
            stack.api.data(f"/api/tasks?search={needle}").get(marked, {}).get("state") == "FAILURE"
        ),
        timeout=30,
        message="the marked task failed",
    )
    open_view(page, stack.api.url, "#/tasks")
    rows = page.locator(ROW)
    expect(rows.first).to_be_visible()
    assert rows.count() >= 10
    screenshot(page, "tasks")

    # state filter: server-side, every row FAILURE
    page.locator("#f-state").select_option("FAILURE")
    expect(page.locator(f"{ROW}:not([data-state=FAILURE])")).to_have_count(0)
    expect(rows.first).to_be_visible()
    assert "state=FAILURE" in page.url  # the filters are in the address (shareable)

    # task name filter on top
    page.locator("#f-taskname").select_option("demo.app.fail")
    expect(page.locator(f"{ROW} td[data-col=name]:not(:text-is('demo.app.fail'))")).to_have_count(0)

    # Flower's search syntax narrows to the one task
    page.locator("#f-state").select_option("")
    page.locator("#f-taskname").select_option("")
    page.locator("#f-search").fill(f"args:{needle}")
    page.locator("#f-search").press("Enter")
    expect(rows).to_have_count(1)
    expect(page.locator(f'{ROW}[data-uuid="{marked}"]')).to_be_visible()
    page.locator("#f-search").fill("args:")  # a bad query: the API's 400 is shown (and logged)
    page.locator("#f-search").press("Enter")
    expect(page.locator("#tasks-error")).to_contain_text("search")
    page.locator("#f-search").fill("")
    page.locator("#f-search").press("Enter")
    expect(page.locator("#tasks-error")).to_be_hidden()

    # a time range ending two hours ago leaves only tasks never received (Flower's rule: they
    # pass a received filter): the ones waiting in the queue no worker consumes
    past = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() - 7200))
    page.locator("#f-to").fill(past)
    page.locator("#f-to").dispatch_event("change")
    expect(page.locator(f"{ROW}[data-state=SUCCESS]")).to_have_count(0)
    expect(rows.first).to_be_visible()
    received = page.locator(f"{ROW} td[data-col=received]").evaluate_all(
        "cells => cells.map(c => c.textContent)"
    )
    assert received and set(received) == {""}, received
    assert "received_end=" in page.url
    page.locator("#f-to").fill("")
    page.locator("#f-to").dispatch_event("change")
    expect(page.locator(f"{ROW}[data-state=SUCCESS]").first).to_be_visible()

    # paging with the API's cursor, over tasks that stay put (their queue has no consumer)
    pager = f"pager-{uuid.uuid4().hex[:10]}"
    waiting = {stack.send("demo.app.fail", pager, queue=IDLE_QUEUE) for _ in range(15)}
    wait_for(
        lambda: len(stack.api.data(f"/api/tasks?search={pager}")) == 15,
        timeout=30,
        message="the tasks to page through",
    )
    page.locator("#f-limit").select_option("10")
    page.locator("#f-search").fill(pager)
    page.locator("#f-search").press("Enter")

    def shown() -> list[str]:
        uuids: list[str] = rows.evaluate_all("rs => rs.map(r => r.dataset.uuid)")
        return uuids

    # the search's page, not the unfiltered one the limit change showed (also 10 rows): a
    # click on "older" before it arrives pages the wrong listing (flaky under load, #11)
    wait_for(
        lambda: len(shown()) == 10 and set(shown()) <= waiting,
        timeout=30,
        message="the first page of the search",
    )
    first_page = shown()
    page.locator("#page-older").click()
    expect(page.locator("#page-label")).to_have_text("page 2")
    expect(rows).to_have_count(5)
    second_page = rows.evaluate_all("rs => rs.map(r => r.dataset.uuid)")
    assert set(first_page) | set(second_page) == waiting and len(first_page + second_page) == 15
    expect(page.locator("#page-older")).to_be_disabled()
    page.locator("#page-newer").click()
    expect(page.locator("#page-label")).to_have_text("page 1")
    expect(page.locator(ROW).first).to_have_attribute("data-uuid", first_page[0])
    page.locator("#f-search").fill("")
    page.locator("#f-search").press("Enter")

    # columns chosen by the user are remembered
    page.locator("#columns-button").click()
    page.locator("#column-picker input[value=exception]").check()
    page.locator("#column-picker input[value=args]").uncheck()
    page.reload()
    expect(page.locator("#tasks th[data-col=exception]")).to_be_visible()
    expect(page.locator("#tasks th[data-col=args]")).to_have_count(0)
    page.locator("#columns-button").click()
    page.locator("#column-picker input[value=args]").check()
    page.locator("#column-picker input[value=exception]").uncheck()
    no_errors(page, "status of 400 (Bad Request)")


def test_finishing_task_shows_up_within_a_second(page: Any, stack: Stack) -> None:
    open_view(page, stack.api.url, "#/tasks")
    expect(page.locator(ROW).first).to_be_visible()
    page.evaluate("window.__notReloaded = true")
    task_id = stack.send("demo.app.slow", 1.5)
    row = page.locator(f'{ROW}[data-uuid="{task_id}"]')
    expect(row).to_have_attribute("data-state", "STARTED", timeout=15_000)

    def finished() -> bool:
        found = stack.api.data(f"/api/task/info/{task_id}")
        return bool(found["state"] == "SUCCESS")

    wait_for(finished, timeout=30, interval=0.02, message="the task succeeded in the API")
    expect(row).to_have_attribute("data-state", "SUCCESS", timeout=1000)
    assert page.evaluate("window.__notReloaded") is True
    no_errors(page)


def test_task_detail(page: Any, stack: Stack) -> None:
    from demo.traffic import client

    app = client(stack.broker_url)
    try:
        chain = app.signature("demo.app.add", (1, 2)) | app.signature("demo.app.mul", (10,))
        child_result = chain.apply_async()
        child = str(child_result.id)
        parent = str(child_result.parent.id)
    finally:
        app.close()
    wait_for(
        lambda: stack.api.data(f"/api/task/info/{child}")["state"] == "SUCCESS",
        timeout=30,
        message="the chain finished",
    )
    open_view(page, stack.api.url, f"#/task/{parent}")
    expect(page.locator("#children")).to_contain_text(child)
    expect(page.locator("#task-events")).to_contain_text("task-succeeded")
    page.locator("#children a").click()
    fields = page.locator("#task-fields")
    expect(fields.locator("tr[data-field=parent]")).to_contain_text(parent)
    expect(fields.locator("tr[data-field=root]")).to_contain_text(parent)
    expect(fields.locator("tr[data-field=result]")).to_contain_text("30")

    failed = next(iter(stack.api.data("/api/tasks?state=FAILURE&taskname=demo.app.fail&limit=1")))
    open_view(page, stack.api.url, f"#/task/{failed}")
    expect(page.locator("#traceback")).to_contain_text("ValueError")
    for kind in ("task-received", "task-started", "task-failed"):
        expect(page.locator(f'#task-events tr[data-type="{kind}"]')).to_have_count(1)
    for field in ("uuid", "name", "state", "args", "kwargs", "exception", "worker", "runtime"):
        expect(fields.locator(f"tr[data-field={field}]")).to_be_visible()
    expect(page.locator("#revoke")).to_be_visible()
    expect(page.locator("#terminate")).to_be_visible()
    screenshot(page, "task", full_page=True)

    # revoke a task that cannot run yet (its queue has no consumer): confirmed, it turns REVOKED
    waiting = stack.send("demo.app.add", 5, 5, queue=IDLE_QUEUE)
    wait_for(lambda: stack.api.data(f"/api/task/info/{waiting}"), timeout=20, message="sent task")
    open_view(page, stack.api.url, f"#/task/{waiting}")
    page.locator("#revoke").click()
    page.locator("#confirm-ok").click()
    expect(page.locator(".toast-ok")).to_contain_text("Revoked")
    no_errors(page)


def test_live_feed_pauses_and_resumes_without_gap(page: Any, stack: Stack) -> None:
    open_view(page, stack.api.url, "#/feed")
    rows = page.locator("#feed tbody tr")
    expect(rows.first).to_be_visible(timeout=10_000)
    screenshot(page, "feed")

    # pause: rows stop moving while events are held; resume shows them
    page.locator("#feed-pause").click()
    count = rows.count()
    expect(page.locator("#feed-status")).to_contain_text("paused")
    expect(page.locator("#feed-status")).not_to_contain_text("paused: 0 new events")
    assert rows.count() == count
    page.locator("#feed-pause").click()
    expect(page.locator("#feed-status")).not_to_contain_text("paused")
    expect(rows).not_to_have_count(count)

    # cut the connection: the API replica is killed, events keep coming, then it is back
    shown_before = rows.evaluate_all("rs => rs.map(r => r.dataset.sid)")
    client = redis.Redis(port=stack.redis.port, db=1)
    stream = Keys(NAMESPACE).all_shards[0].stream
    try:
        stack.api.kill()
        expect(page.locator("#conn")).not_to_have_attribute("data-state", "live")
        length = client.xlen(stream)
        wait_for(lambda: client.xlen(stream) >= length + 15, timeout=30, message="more events")
        stack.api.start()
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
        last_before_restart = entries(client.xrevrange(stream, count=1))[0][0].decode()
        # the feed catches up past what was written while it was away
        wait_for(
            lambda: rows.first.get_attribute("data-sid") > last_before_restart,
            timeout=20,
            message="the feed past the outage",
        )
        shown = rows.evaluate_all("rs => rs.map(r => r.dataset.sid)")
        assert len(shown) == len(set(shown)), "an event shown twice"
        assert set(shown_before) <= set(shown)
        oldest, newest = shown[-1], shown[0]
        expected = [
            sid.decode() for sid, _ in entries(client.xrevrange(stream, max=newest, min=oldest))
        ]
        assert shown == expected, "the feed is not the stream: a gap or a reordering"
    finally:
        client.close()
        if not stack.api.process.alive():
            stack.api.start()


def test_charts(page: Any, stack: Stack) -> None:
    # the runtime chart lists what has succeeded when the view loads: a slow task (3 s, one
    # in twenty of the demo traffic) has, once the stack has run a while; alone, this test
    # came first and the chart could still lack one
    wait_for(
        lambda: stack.api.data("/api/tasks?taskname=demo.app.slow&state=SUCCESS&limit=1"),
        timeout=60,
        message="a demo.app.slow task succeeded",
    )
    open_view(page, stack.api.url, "#/charts?minutes=15")
    expect(page.locator("#chart-by-state svg rect").first).to_be_attached()
    expect(page.locator("#chart-by-state .legend")).to_contain_text("SUCCESS")
    expect(page.locator("#chart-by-state .legend")).to_contain_text("FAILURE")
    expect(page.locator("#chart-by-name .legend")).to_contain_text("demo.app.add")
    expect(page.locator("#chart-failure-rate svg path.line")).to_be_attached()
    expect(page.locator("#chart-runtime svg")).to_contain_text("demo.app.slow")
    expect(page.locator("#chart-queues .legend")).to_contain_text(IDLE_QUEUE)
    # waits by task name and queue: the demo traffic's tasks waited in the celery queue
    expect(page.locator("#chart-wait svg")).to_contain_text("in queue (celery)")
    expect(page.locator("#chart-wait .legend")).to_contain_text("p95 a day before")
    # the queue nobody consumes: its messages wait, the oldest one aged from its task-sent
    idle = page.locator(f'#chart-queues-now tr[data-queue="{IDLE_QUEUE}"]')
    expect(idle.locator(".oldest")).to_have_text(re.compile(r"^\d+(\.\d+)? (s|ms|m \d+ s)$"))
    expect(page.locator("#chart-totals")).to_contain_text("failure rate")
    screenshot(page, "charts")
    no_errors(page)


def test_read_only_hides_controls(page: Any, stack: Stack) -> None:
    open_view(page, stack.read_only.url, f"#/worker/{WORKER}")
    expect(page.locator("#registered")).to_contain_text("demo.app.add")
    expect(page.locator("#who")).to_have_text("read-only")
    for control in ("#pool-grow", "#shutdown", "#add-consumer", "#worker-controls"):
        expect(page.locator(control)).to_have_count(0)
    failed = next(iter(stack.read_only.data("/api/tasks?state=FAILURE&limit=1")))
    open_view(page, stack.read_only.url, f"#/task/{failed}")
    expect(page.locator("#task-fields")).to_contain_text(failed)
    expect(page.locator("#revoke")).to_have_count(0)
    expect(page.locator("#terminate")).to_have_count(0)
    open_view(page, stack.read_only.url, "#/alerts")
    expect(page.locator("#alert-rules")).to_be_visible()
    expect(page.locator("#alert-form")).to_have_count(0)
    no_errors(page)


def test_token_sign_in(page: Any, stack: Stack) -> None:
    """With tokens configured the page's data needs one: the page asks, then uses it for REST
    and the WebSocket; a read-only token gives a read-only dashboard."""
    secured = Api(
        stack.env, stack.workdir / "api-token.log", POLLEN_API_TOKENS="full-token,ro-token:ro"
    )
    try:
        page.goto(f"{secured.url}/#/worker/{WORKER}")
        expect(page.locator("#signin")).to_be_visible()
        page.locator("#signin-token").fill("ro-token")
        page.locator("#signin button[value=ok]").click()
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=10_000)
        expect(page.locator("#registered")).to_contain_text("demo.app.add")
        # who is signed in, and that the credential only reads
        expect(page.locator("#who")).to_have_text("token#2:ro · read-only")
        expect(page.locator("#pool-grow")).to_have_count(0)
        page.locator("#signout").click()
        expect(page.locator("#signin")).to_be_visible()
        no_errors(page, "status of 401 (Unauthorized)")
    finally:
        secured.stop()


def test_responsive_at_1k_events_per_second(page: Any, stack: Stack) -> None:
    """Synthetic workers publish about 1,000 events/s through celery's EventDispatcher; the
    page keeps up (the API never cuts it as too slow, it never reconnects) and still answers
    clicks. How fast it answers is not asserted (a timing on 2 shared cores, flaky under CI
    load): the deadlines below only bound the wait."""
    open_view(page, stack.api.url, "#/feed")
    expect(page.locator("#feed tbody tr").first).to_be_visible(timeout=10_000)
    generator = Process(
        [
            PYTHON,
            "-m",
            "bench.generator",
            "--broker",
            stack.broker_url,
            "--tasks",
            "2500",
            "--rate",
            "1000",
            "--batched",
            "--workers",
            "2",
            "--tag",
            "load",
        ],
        stack.workdir / "generator.log",
    )
    try:
        wait_for(
            lambda: int(page.locator("#rate").inner_text().split()[0]) >= 500,
            timeout=30,
            message="the page receiving 500+ events/s",
        )
        for _ in range(3):
            page.locator("#feed-pause").click()
            expect(page.locator("#feed-status")).to_contain_text("paused", timeout=10_000)
            page.locator("#feed-pause").click()
            expect(page.locator("#feed-status")).not_to_contain_text("paused", timeout=10_000)
        page.locator("nav a[data-view=tasks]").click()
        expect(page.locator(ROW).first).to_be_visible(timeout=10_000)
        page.locator("nav a[data-view=feed]").click()
        expect(page.locator("#feed tbody tr").first).to_be_visible(timeout=10_000)
        assert page.locator("#feed tbody tr").count() <= 1000
        wait_for(lambda: not generator.alive(), timeout=60, message="the generator done")
    finally:
        generator.stop()
    assert page.locator("#conn").get_attribute("data-connects") == "1", "reconnected"
    assert "too slow" not in stack.api.process.output()
    no_errors(page)


def task_event(kind: str, task_id: str, hostname: str, ts: float, **fields: Any) -> dict[str, Any]:
    """A task event as celery's EventDispatcher sends it (the collector's receive time just
    after)."""
    return {"type": kind, "uuid": task_id, "hostname": hostname, "timestamp": ts,
            "local_received": ts + 0.01, "clock": int(ts * 10), "pid": 4242,
            "utcoffset": 0, **fields}  # fmt: skip


def lifecycle(task_id: str, name: str, host: str, ts: float, done: bool) -> list[dict[str, Any]]:
    """Received (then started and succeeded when ``done``) on ``host`` from ``ts`` on."""
    received = {"name": name, "args": "(1,)", "kwargs": "{}", "retries": 0, "root_id": task_id,
                "parent_id": None, "eta": None, "expires": None}  # fmt: skip
    out = [task_event("task-received", task_id, host, ts, **received)]
    if done:
        out.append(task_event("task-started", task_id, host, ts + 0.1))
        out.append(task_event("task-succeeded", task_id, host, ts + 0.2, result="2", runtime=0.1))
    return out


def test_lost_tasks(page: Any, stack: Stack) -> None:
    """Tasks RECEIVED on a worker that died are lost: a badge on their rows and on their page,
    the "Lost only" filter, the worker's lost count; a redelivery to another worker clears the
    mark live. The events go through the collector's write path to the stack's Redis, the
    death as the enabler sends it (``readback.death``): at the worker's last word, its newest
    task event (the stack's enabler finds the same death by itself, the same time)."""
    tag = uuid.uuid4().hex[:10]
    name, gone, live = f"demo.lost_{tag}", f"gone-{tag}@pollen-demo", f"live-{tag}@pollen-demo"
    first, second, done = (str(uuid.uuid4()) for _ in range(3))
    t0 = float(int(time.time()) - 300)
    died = t0 + 0.5  # the newest event of ``gone``: its last word
    settings = load(stack.env)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        writer = Writer(client, settings)
        readback.apply(
            writer,
            [
                *lifecycle(done, name, gone, t0, done=True),
                *lifecycle(first, name, gone, t0 + 0.3, done=False),
                *lifecycle(second, name, gone, died, done=False),
            ],
            now=time.time(),
        )
        readback.death(writer, gone, died, now=time.time())

        def lost_now() -> dict[str, float]:
            found = stack.api.data(f"/api/tasks?lost=1&taskname={name}")
            return {task_id: task["lost_at"] for task_id, task in found.items()}

        wait_for(
            lambda: lost_now() == {first: died, second: died},
            timeout=20,
            message="the two tasks lost in the API",
        )

        # the badge on the lost rows only, in words (not colour only)
        open_view(page, stack.api.url, f"#/tasks?taskname={name}")
        rows = page.locator(ROW)
        expect(rows).to_have_count(3)
        for task_id in (first, second):
            row = page.locator(f'{ROW}[data-uuid="{task_id}"]')
            expect(row).to_have_attribute("data-lost", "true")
            expect(row.locator("td[data-col=state] .badge.lost")).to_have_text("lost")
            expect(row.locator("td[data-col=state]")).to_contain_text("RECEIVED")
        control = page.locator(f'{ROW}[data-uuid="{done}"]')
        expect(control).to_have_attribute("data-lost", "false")
        expect(control.locator(".badge.lost")).to_have_count(0)

        # "Lost only": lost=1 on the query and in the address
        page.locator("#f-lost").check()
        expect(page.locator(f'{ROW}[data-uuid="{done}"]')).to_have_count(0)
        expect(rows).to_have_count(2)
        assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.uuid)")) == {first, second}
        assert "lost=1" in page.url
        page.reload()
        expect(page.locator("#f-lost")).to_be_checked()
        expect(rows).to_have_count(2)
        page.locator("#f-lost").uncheck()
        expect(rows).to_have_count(3)
        assert "lost=" not in page.url

        # redelivered to a live worker, where it succeeds: the badge goes, without a reload
        page.evaluate("window.__notReloaded = true")
        readback.apply(writer, lifecycle(first, name, live, t0 + 2, done=True), now=time.time())
        row = page.locator(f'{ROW}[data-uuid="{first}"]')
        expect(row).to_have_attribute("data-lost", "false")
        expect(row).to_have_attribute("data-state", "SUCCESS")
        expect(row.locator(".badge.lost")).to_have_count(0)
        expect(row.locator("td[data-col=worker]")).to_have_text(live)
        expect(page.locator(f'{ROW}[data-uuid="{second}"] .badge.lost')).to_have_text("lost")
        assert page.evaluate("window.__notReloaded") is True

        # the task's page: the badge, and lost_at as the other times are shown
        open_view(page, stack.api.url, f"#/task/{second}")
        fields = page.locator("#task-fields")
        expect(page.locator(".toolbar .badge.lost")).to_have_text("lost")
        expect(fields.locator("tr[data-field=lost] .badge.lost")).to_have_text("lost")
        at = datetime.fromtimestamp(died, ZoneInfo("Europe/Berlin"))  # the browser's zone
        expect(fields.locator("tr[data-field=lost_at] td")).to_have_text(
            f"{at:%d/%m/%Y, %H:%M:%S}.500"
        )

        # the workers: the dead one's lost count, down to 0 once its other task is redelivered
        open_view(page, stack.api.url, "")
        count = page.locator(f'#workers tr[data-worker="{gone}"] td.lost-count')
        expect(count).to_have_text("1")
        expect(count.get_by_role("link", name="1")).to_have_attribute(
            "href", f"#/tasks?workername={gone.replace('@', '%40')}&lost=1"
        )
        expect(page.locator(f'#workers tr[data-worker="{live}"] td.lost-count')).to_have_text("0")
        readback.apply(writer, lifecycle(second, name, live, t0 + 3, done=True), now=time.time())
        # live from the task-lost event (the periodic refresh, every 10 s, would also get there)
        expect(count).to_have_text("0", timeout=15_000)
        assert lost_now() == {}
    finally:
        client.close()
    no_errors(page)


def test_export_buttons(page: Any, stack: Stack, tmp_path: Path) -> None:
    """The tasks view's export buttons save every task of its filters (not only the page): as
    a plain link, and, with a bearer token (which a link cannot carry), fetched with it."""
    needle = f"export-{uuid.uuid4().hex[:10]}"
    sent = {stack.send("demo.app.fail", needle, i) for i in range(3)}
    wait_for(
        lambda: (
            {
                u
                for u, t in stack.api.data(f"/api/tasks?search=args:{needle}").items()
                if t["state"] == "FAILURE"
            }
            == sent
        ),
        timeout=30,
        message="the three marked tasks failed",
    )
    # a page of one task: the export still has all three
    open_view(page, stack.api.url, f"#/tasks?search=args%3A{needle}&limit=1")
    expect(page.locator(ROW)).to_have_count(1)
    with page.expect_download() as caught:
        page.locator("#export-csv").click()
    saved = tmp_path / "tasks.csv"
    caught.value.save_as(saved)
    assert caught.value.suggested_filename == "tasks.csv"
    rows = list(csv.DictReader(saved.open(newline="")))
    assert {r["uuid"] for r in rows} == sent
    assert {(r["name"], r["state"]) for r in rows} == {("demo.app.fail", "FAILURE")}
    no_errors(page)

    secured = Api(stack.env, stack.workdir / "api-export.log", POLLEN_API_TOKENS="view-token:ro")
    try:
        page.goto(f"{secured.url}/#/tasks?search=args%3A{needle}")
        page.locator("#signin-token").fill("view-token")
        page.locator("#signin button[value=ok]").click()
        expect(page.locator(ROW)).to_have_count(3)
        with page.expect_download() as caught:
            page.locator("#export-ndjson").click()
        saved = tmp_path / "tasks.ndjson"
        caught.value.save_as(saved)
        lines = [json.loads(line) for line in saved.read_text().splitlines()]
        assert {t["uuid"] for t in lines} == sent
        assert all(t["exception"] and needle in t["args"] for t in lines)
        no_errors(page, "status of 401 (Unauthorized)")
    finally:
        secured.stop()


def test_failures_view(page: Any, stack: Stack) -> None:
    """Failures grouped by exception class, live: a class of the app's own shows up with its
    count and sparkline, its link lists exactly its tasks, and a new failure updates the row
    without a reload."""
    needle = f"fx-{uuid.uuid4().hex[:8]}"

    def demo_errors() -> int:
        for c in stack.api.data("/api/failures")["classes"]:
            if c["exception"] == "DemoError":
                return int(c["count"])
        return 0

    before = demo_errors()
    sent = {stack.send("demo.app.fail_as", "DemoError", needle) for _ in range(2)}
    wait_for(lambda: demo_errors() == before + 2, timeout=30, message="two DemoErrors counted")
    open_view(page, stack.api.url, "#/failures")
    row = page.locator('#failures tr[data-exception="DemoError"]')
    expect(row.locator("td[data-col=count]")).to_contain_text(str(before + 2))
    expect(row.locator("td[data-col=names]")).to_contain_text("demo.app.fail_as")
    expect(row.locator("td[data-col=workers]")).to_contain_text(WORKER)
    assert row.locator("svg.sparkline rect").count() >= 1
    # the other classes the demo traffic makes are there too (ValueError from demo.app.fail)
    expect(page.locator('#failures tr[data-exception="ValueError"]')).to_be_visible()
    screenshot(page, "failures")

    # live: one more failure updates the count without a reload
    sent.add(stack.send("demo.app.fail_as", "DemoError", needle))
    expect(row.locator("td[data-col=count]")).to_contain_text(str(before + 3), timeout=15_000)

    # the link lists the class's tasks: every one a DemoError, the ones sent among them
    row.locator("a").click()
    expect(page.locator("#f-exception")).to_have_text("exception: DemoError ✕")
    rows = page.locator(ROW)
    expect(rows.first).to_be_visible()
    expect(
        page.locator(f"{ROW} td[data-col=name]:not(:text-is('demo.app.fail_as'))")
    ).to_have_count(0)
    for u in sent:
        expect(page.locator(f'{ROW}[data-uuid="{u}"]')).to_be_visible()
    page.locator("#f-exception").click()
    expect(page.locator("#f-exception")).to_be_hidden()
    assert "exception=" not in page.url
    no_errors(page)


def test_bulk_revoke_from_the_tasks_view(page: Any, stack: Stack) -> None:
    # tasks that cannot run yet (their queue has no consumer), told apart by their arguments
    ids = {stack.send("demo.app.mul", "bulkdash", i, queue=IDLE_QUEUE) for i in range(3)}
    wait_for(
        lambda: {u for u in ids if stack.api.data(f"/api/task/info/{u}")} == ids,
        timeout=20,
        message="the sent tasks in Pollen",
    )
    filters = "taskname=demo.app.mul&state=PENDING&search=args:bulkdash"
    assert set(stack.api.data(f"/api/tasks?{filters}")) == ids
    open_view(page, stack.api.url, f"#/tasks?{filters}")
    expect(page.locator(ROW)).to_have_count(3)
    page.locator("#bulk-button").click()
    page.locator("#bulk-dry-run").click()
    expect(page.locator("#bulk-summary")).to_contain_text("3 task(s) selected; 3 would be revoked")
    for u in ids:
        expect(page.locator(f'#bulk-tasks li[data-uuid="{u}"]')).to_be_visible()
    # the dry run touched nothing: no revoke in the audit yet
    audited = stack.api.data("/api/audit")["entries"]
    assert not [e for e in audited if e["action"] == "tasks.bulk_revoke" and e.get("task_ids")]
    page.locator("#bulk-run").click()
    expect(page.locator("#confirm-text")).to_contain_text("the 3 task(s) listed")
    page.locator("#confirm-ok").click()
    expect(page.locator(".toast-ok")).to_contain_text("3 task(s) revoked")
    entry = next(
        e for e in stack.api.data("/api/audit")["entries"] if e["action"] == "tasks.bulk_revoke"
    )
    assert set(entry["task_ids"]) == ids and entry["status"] == 200
    # re-send lists why a task cannot go again, or that it can
    page.select_option("#bulk-action", "resend")
    page.locator("#bulk-dry-run").click()
    expect(page.locator("#bulk-summary")).to_contain_text("3 would be re-sent")
    no_errors(page)


def test_alerts_view(page: Any, stack: Stack) -> None:
    # an admin adds a rule in the page; the enabler fires it (the idle queue has messages)
    open_view(page, stack.api.url, "#/alerts")
    expect(page.locator("#alerts-now")).to_contain_text("Nothing firing")
    page.fill("#rule-name", "idle-backlog")
    page.select_option("#rule-kind", "queue_length")
    page.fill("#rule-match", IDLE_QUEUE)
    page.fill("#rule-threshold", "1")
    page.locator("#rule-save").click()
    expect(page.locator(".toast-ok")).to_contain_text("Rule idle-backlog saved")
    expect(page.locator('#alert-rules tr[data-rule="idle-backlog"]')).to_contain_text(
        "queue_length"
    )
    firing = page.locator(f'#alerts-now tr[data-rule="idle-backlog"][data-subject="{IDLE_QUEUE}"]')
    expect(firing).to_have_attribute("data-state", "firing", timeout=20_000)
    expect(page.locator('#alerts-history tr[data-event="firing"]')).to_contain_text("idle-backlog")
    rule = stack.api.data("/api/alerts/rules")["rules"]["idle-backlog"]
    assert (rule["kind"], rule["match"], rule["threshold"]) == ("queue_length", IDLE_QUEUE, 1.0)
    screenshot(page, "alerts")
    # deleting it (confirmed) resolves the alert
    page.locator('#alert-rules button[data-delete="idle-backlog"]').click()
    page.locator("#confirm-ok").click()
    expect(page.locator('#alert-rules tr[data-rule="idle-backlog"]')).to_have_count(0)
    expect(page.locator('#alerts-history tr[data-event="resolved"]')).to_contain_text(
        "idle-backlog", timeout=20_000
    )
    no_errors(page)
