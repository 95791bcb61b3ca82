"""Bulk actions over a task query, against the control stack's real worker: a dry run lists
what would be touched, a real run revokes (the worker then discards the queued tasks) or
publishes again with the original arguments, capped, operator only, and the audit keeps every
id touched."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from services.api.control.bulk import CUT, REDACTED, original_call
from tests.control.conftest import ApiFactory, Stack
from tests.control.test_control import eventually, task_state
from tests.support.cluster import KEYS, client

#: A queue the stack's worker does not consume until the test tells it to.
HELD = "held-for-bulk"


def send(stack: Stack, name: str, args: tuple[Any, ...], **options: Any) -> str:
    app = client(stack.broker_url)
    app.conf.task_send_sent_event = True
    try:
        return str(app.send_task(name, args, **options).id)
    finally:
        app.close()


async def listed(http: Any, **query: str) -> dict[str, Any]:
    response = await http.get("/api/tasks", params=query)
    body: dict[str, Any] = await response.json()
    return body


async def audit_entries(http: Any, action: str) -> list[dict[str, Any]]:
    body = await (await http.get("/api/audit")).json()
    return [e for e in body["entries"] if e["action"] == action]


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ("(1, 'a')", "{'b': [2, 3]}", ((1, "a"), {"b": [2, 3]})),
        ("[]", "{}", ([], {})),
        # celery's saferepr cuts a long text short with '...', itself a literal
        (
            "('aaaa', ...)",
            "{}",
            "arguments not recorded in full (cut short, or not Python literals)",
        ),
        ("('aaaa", "{}", "arguments not recorded in full (cut short, or not Python literals)"),
        (
            "(<object at 0x1>,)",
            "{}",
            "arguments not recorded in full (cut short, or not Python literals)",
        ),
        # a long text whose string ends in '...' inside its quotes: saferepr cut it
        ("('" + "x" * 1030 + "...',)", "{}", CUT),
        # a short one ending so is the real value
        ("('wait...',)", "{}", (("wait...",), {})),
        # redacted by the collector: sent again, the marker would be the argument
        ("(1,)", "{'password': '[redacted]'}", REDACTED),
        ("1", "{}", "arguments not recorded as a list and a dict"),
        (None, "{}", "no arguments recorded (no task-sent or task-received event seen)"),
    ],
)
def test_original_call(args: Any, kwargs: Any, expected: Any) -> None:
    assert original_call({"args": args, "kwargs": kwargs}) == expected


async def test_bulk_revoke(stack: Stack, api: ApiFactory, state: redis.Redis) -> None:
    http = await api(bulk_max="10")
    ids = {send(stack, "demo.app.mul", (i, 3), queue=HELD) for i in range(4)}
    query = {"taskname": "demo.app.mul", "state": "PENDING"}

    async def all_pending() -> bool:
        return set(await listed(http, **query)) == ids

    await eventually(all_pending, message="the held tasks PENDING in Pollen")

    # a dry run (the default) lists them and touches nothing
    before = state.xlen(KEYS.audit)
    response = await http.post("/api/tasks/bulk/revoke", params=query)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["dry_run"] is True and body["revoked"] == 0
    assert (body["matched"], body["capped"]) == (4, False)
    assert {t["uuid"] for t in body["tasks"]} == ids
    assert all(t["name"] == "demo.app.mul" and t["state"] == "PENDING" for t in body["tasks"])
    # the filters may come in a form body too (the dashboard posts them so)
    response = await http.post("/api/tasks/bulk/revoke", data=query)
    assert {t["uuid"] for t in (await response.json())["tasks"]} == ids
    # capped: the first ones in the query's order, and it says more matched
    response = await http.post("/api/tasks/bulk/revoke", params={**query, "limit": "3"})
    body = await response.json()
    assert (body["matched"], body["capped"]) == (3, True)
    assert [t["uuid"] for t in body["tasks"]] == list(await listed(http, **query, limit="3"))
    for bad in ({"limit": "11"}, {"limit": "0"}, {"sort_by": "nope"}, {"signal": "SIGNOPE"}):
        response = await http.post("/api/tasks/bulk/revoke", params={**query, **bad})
        assert response.status == 400, bad
        assert "error" in await response.json()
    assert state.xlen(KEYS.audit) == before + 7  # dry runs and refusals are recorded too

    response = await http.post("/api/tasks/bulk/revoke", params={**query, "dry_run": "false"})
    body = await response.json()
    assert (body["dry_run"], body["revoked"], body["matched"]) == (False, 4, 4)
    entry = (await audit_entries(http, "tasks.bulk_revoke"))[0]
    assert entry["status"] == 200 and set(entry["task_ids"]) == ids
    assert entry["params"]["dry_run"] == "false"

    # the worker that got the revoke discards them when it takes them from the queue
    response = await http.post(
        f"/api/worker/queue/add-consumer/{stack.hostname}", params={"queue": HELD}
    )
    assert response.status == 200, await response.text()
    try:

        async def all_revoked() -> bool:
            states = await asyncio.gather(*(task_state(http, u) for u in ids))
            return all(s == "REVOKED" for s in states)

        await eventually(all_revoked, message="the held tasks REVOKED by the worker")
    finally:
        await http.post(
            f"/api/worker/queue/cancel-consumer/{stack.hostname}", params={"queue": HELD}
        )


async def test_bulk_resend(stack: Stack, api: ApiFactory) -> None:
    http = await api()
    # two failures with short arguments, one whose arguments celery cut short in its events
    short = {send(stack, "demo.app.fail_as", ("KeyError", f"bulk-{i}")) for i in range(2)}
    long_one = send(stack, "demo.app.fail_as", ("KeyError", "x" * 3000))

    async def failed() -> bool:
        states = await asyncio.gather(*(task_state(http, u) for u in [*short, long_one]))
        return all(s == "FAILURE" for s in states)

    await eventually(failed, message="the tasks failed")
    query = {"taskname": "demo.app.fail_as", "state": "FAILURE"}
    response = await http.post("/api/tasks/bulk/resend", params=query)
    body = await response.json()
    rows = {t["uuid"]: t for t in body["tasks"]}
    assert body["dry_run"] is True and body["resent"] == 0
    assert {*short, long_one} <= set(rows)
    assert all(rows[u]["resend"] and rows[u]["queue"] == "celery" for u in short)
    assert rows[long_one]["resend"] is False
    assert "not recorded in full" in rows[long_one]["reason"]
    originals = {u: (await (await http.get(f"/api/task/info/{u}")).json()) for u in short}

    response = await http.post(
        "/api/tasks/bulk/resend", params={**query, "dry_run": "0", "search": "args:bulk-"}
    )
    body = await response.json()
    assert response.status == 200, body
    resent = {t["uuid"]: t["new_uuid"] for t in body["tasks"] if t.get("new_uuid")}
    assert set(resent) == short and body["resent"] == 2

    async def ran_again() -> bool:
        states = await asyncio.gather(*(task_state(http, u) for u in resent.values()))
        return all(s == "FAILURE" for s in states)

    await eventually(ran_again, message="the re-sent tasks ran")
    for old, new in resent.items():
        again = await (await http.get(f"/api/task/info/{new}")).json()
        assert (again["name"], again["args"], again["kwargs"]) == (
            originals[old]["name"],
            originals[old]["args"],
            originals[old]["kwargs"],
        )
    entry = (await audit_entries(http, "tasks.bulk_resend"))[0]
    assert dict(zip(entry["task_ids"], entry["new_task_ids"], strict=True)) == resent


async def test_bulk_needs_an_operator(stack: Stack, api: ApiFactory) -> None:
    tokens = await api(api_tokens="admin-secret,op-secret:op,ro-secret:ro")
    for path in ("/api/tasks/bulk/revoke", "/api/tasks/bulk/resend"):
        response = await tokens.post(path, headers={"Authorization": "Bearer ro-secret"})
        assert response.status == 403, path
        response = await tokens.post(path, headers={"Authorization": "Bearer op-secret"})
        assert response.status == 200, path
        assert (await response.json())["dry_run"] is True
