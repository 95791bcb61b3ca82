"""Control through the API against a real prefork worker on a real broker.

Effects are checked where they happen: in the worker's own inspect answers, in Pollen's task
state (as the collector recorded the worker's events), and in the audit stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from tests.control.conftest import ApiFactory, Stack
from tests.support.cluster import KEYS, client, wait_worker_up
from tests.support.servers import celery_worker


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 60.0, message: str = "condition"
) -> Any:
    """``wait_for`` for a check that is awaited: polled until it holds or the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {message} (last: {last!r})")


def inspector(stack: Stack, method: str, *args: Any) -> Callable[[], Awaitable[Any]]:
    """The worker's own answer to an inspect method, asked in a thread."""

    def ask() -> Any:
        app = client(stack.broker_url)
        try:
            answers = getattr(app.control.inspect(destination=[stack.hostname], timeout=2), method)(
                *args
            )
        finally:
            app.close()
        return (answers or {}).get(stack.hostname)

    async def check() -> Any:
        return await asyncio.to_thread(ask)

    return check


async def task_state(api: Any, task_id: str) -> str | None:
    response = await api.get(f"/api/task/info/{task_id}")
    if response.status != 200:
        return None
    return str((await response.json())["state"])


async def test_worker_control(stack: Stack, api: ApiFactory) -> None:
    http = await api()
    name = stack.hostname

    # /api/workers and /api/queues/length answer from what the enabler stored
    response = await http.get("/api/workers", params={"workername": name})
    info = (await response.json())[name]
    assert "demo.app.add" in info["registered"] and info["conf"]
    assert info["stats"]["pool"]["max-concurrency"] == 2 and info["timestamp"] > 0
    assert info["active"] == [] and [q["name"] for q in info["active_queues"]] == ["celery"]
    info = (await (await http.get("/api/workers")).json())[name]
    assert "stats" in info and "active" not in info  # task lists only for one worker (Flower)

    async def celery_queue() -> Any:
        body = await (await http.get("/api/queues/length")).json()
        return [q for q in body["active_queues"] if q["name"] == "celery"]

    [queue] = await eventually(celery_queue, message="the celery queue sampled")
    assert queue["messages"] == 0
    history = (await (await http.get("/api/queues/history")).json())["history"]
    assert history and history[-1]["queues"]["celery"] == 0
    assert history[-1]["time"] % 60 == 0 and history[-1]["time"] > time.time() - 120
    assert (await http.get("/api/queues/history", params={"minutes": "0"})).status == 400

    response = await http.post("/api/worker/pool/grow/nobody@nowhere")
    assert response.status == 404
    assert (await response.json())["error"] == "Unknown worker 'nobody@nowhere'"

    # a rate limit set through the API shows in the worker's answers
    response = await http.post(
        "/api/task/rate-limit/demo.app.add", data={"workername": name, "ratelimit": "7/m"}
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["message"] == "new rate limit set successfully"
    registered = await inspector(stack, "registered", "rate_limit")()
    assert "demo.app.add [rate_limit=7/m]" in registered

    response = await http.post(
        "/api/task/timeout/demo.app.mul", params={"workername": name, "soft": "11", "hard": "22"}
    )
    assert response.status == 200, await response.text()
    registered = await inspector(stack, "registered", "soft_time_limit", "time_limit")()
    assert "demo.app.mul [soft_time_limit=11.0 time_limit=22.0]" in registered

    response = await http.post(
        "/api/task/rate-limit/demo.app.nope", data={"workername": name, "ratelimit": "1/s"}
    )
    assert response.status == 403 and "unknown task" in (await response.json())["error"]

    # pool grow / shrink show in stats
    async def processes() -> int:
        stats = await inspector(stack, "stats")()
        return len(stats["pool"]["processes"])

    assert await processes() == 2
    response = await http.post(f"/api/worker/pool/grow/{name}", params={"n": "2"})
    assert response.status == 200, await response.text()
    assert (await response.json())["message"] == f"Growing '{name}' worker's pool by 2"
    await eventually(lambda: _eq(processes(), 4), message="pool grown to 4")
    response = await http.post(f"/api/worker/pool/shrink/{name}", data={"n": "2"})
    assert response.status == 200, await response.text()
    await eventually(lambda: _eq(processes(), 2), message="pool shrunk to 2")
    response = await http.post(f"/api/worker/pool/grow/{name}", params={"n": "x"})
    assert response.status == 400 and (await response.json())["error"].startswith("n:")

    # consumers
    response = await http.post(f"/api/worker/queue/add-consumer/{name}", data={"queue": "extra"})
    assert response.status == 200, await response.text()

    async def consumed() -> set[str]:
        return {q["name"] for q in await inspector(stack, "active_queues")()}

    # the worker answers before its consumer has changed: wait for it
    await eventually(lambda: _has(consumed(), "extra"), message="consuming from extra")
    response = await http.post(f"/api/worker/queue/cancel-consumer/{name}", data={"queue": "extra"})
    assert response.status == 200
    assert (await response.json())["message"] == "no longer consuming from extra"
    await eventually(lambda: _lacks(consumed(), "extra"), message="extra cancelled")

    # refusals by the worker are 403 with its reason (as Flower)
    response = await http.post(f"/api/worker/pool/restart/{name}")
    assert response.status == 403
    assert "Pool restarts not enabled" in (await response.json())["error"]
    response = await http.post(f"/api/worker/pool/autoscale/{name}", data={"min": 1, "max": 3})
    assert response.status == 403

    # every call above is in the audit stream, newest first
    response = await http.get("/api/audit", params={"limit": "3"})
    body = await response.json()
    assert [e["action"] for e in body["entries"]] == [
        "worker.pool_autoscale",
        "worker.pool_restart",
        "worker.cancel_consumer",
    ]
    entry = body["entries"][0]
    assert entry["who"] == "anonymous" and entry["target"] == name
    assert entry["status"] == 403 and entry["params"] == {"min": "1", "max": "3"}
    assert entry["time"] > time.time() - 120
    older = await http.get("/api/audit", params={"limit": "100", "before": body["next"]})
    actions = [e["action"] for e in (await older.json())["entries"]]
    assert actions[:2] == ["worker.add_consumer", "worker.pool_grow"]
    assert "task.rate_limit" in actions and "task.time_limit" in actions


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _has(values: Awaitable[set[str]], item: str) -> bool:
    return item in await values


async def _lacks(values: Awaitable[set[str]], item: str) -> bool:
    return item not in await values


async def test_task_control(stack: Stack, api: ApiFactory) -> None:
    http = await api()

    response = await http.post("/api/task/apply/demo.app.add", json={"args": [2, 3]})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["state"] == "SUCCESS" and body["result"] == 5 and body["task-id"]

    response = await http.post("/api/task/apply/demo.app.fail", json={"args": ["bad"]})
    body = await response.json()
    assert body["state"] == "FAILURE" and "bad" in body["result"] and body["traceback"]

    response = await http.post("/api/task/apply/demo.app.nope", json={"args": []})
    assert response.status == 404
    response = await http.post("/api/task/apply/demo.app.add", json={"args": [1], "bogus": 1})
    assert response.status == 400 and (await response.json())["error"].startswith("bogus:")
    response = await http.post("/api/task/apply/demo.app.add", data=b"[1, 2]")
    assert response.status == 400

    # apply's wait is bounded: a slow task answers its current state
    response = await http.post(
        "/api/task/apply/demo.app.slow", json={"args": [1.5], "timeout": 0.2}
    )
    body = await response.json()
    assert response.status == 200 and body["state"] in ("PENDING", "STARTED")
    assert "result" not in body

    response = await http.post("/api/task/async-apply/demo.app.mul", json={"args": [6, 7]})
    body = await response.json()
    assert response.status == 200 and body["state"] == "PENDING"
    # the API long-polls the backend: it answers as soon as the result is there, the
    # timeout (the largest allowed) is only a deadline
    result = await http.get(f"/api/task/result/{body['task-id']}", params={"timeout": "60"})
    assert (await result.json()) == {"task-id": body["task-id"], "state": "SUCCESS", "result": 42}

    response = await http.post(
        "/api/task/send-task/demo.app.add", json={"args": [1, 1], "task_id": "fixed-id-1"}
    )
    assert (await response.json())["task-id"] == "fixed-id-1"

    # revoking a countdown task ends REVOKED (the worker says so when the countdown ends)
    response = await http.post(
        "/api/task/send-task/demo.app.add", json={"args": [0, 0], "countdown": 4}
    )
    waiting = (await response.json())["task-id"]
    await eventually(lambda: _eq(task_state(http, waiting), "RECEIVED"), message="received")
    response = await http.post(f"/api/task/revoke/{waiting}")
    assert (await response.json()) == {"message": f"Revoked '{waiting}'"}
    await eventually(lambda: _eq(task_state(http, waiting), "REVOKED"), message="revoked")
    listed = await (await http.get("/api/tasks", params={"state": "REVOKED"})).json()
    assert listed[waiting]["state"] == "REVOKED" and listed[waiting]["name"] == "demo.app.add"

    # terminate stops a running task
    response = await http.post("/api/task/async-apply/demo.app.slow", json={"args": [60]})
    running = (await response.json())["task-id"]
    await eventually(lambda: _eq(task_state(http, running), "STARTED"), message="started")
    response = await http.post(
        f"/api/task/revoke/{running}", data={"terminate": "true", "signal": "KILL"}
    )
    assert response.status == 200
    await eventually(lambda: _eq(task_state(http, running), "REVOKED"), message="terminated")
    active = await inspector(stack, "active")()
    assert running not in {t["id"] for t in active}
    response = await http.post(f"/api/task/revoke/{running}", data={"signal": "SIGNOPE"})
    assert response.status == 400 and (await response.json())["error"].startswith("signal:")

    # abort an AbortableTask through the result backend
    response = await http.post("/api/task/async-apply/demo.app.abortable", json={"args": [60]})
    aborting = (await response.json())["task-id"]
    await eventually(lambda: _eq(task_state(http, aborting), "STARTED"), message="started")
    response = await http.post(f"/api/task/abort/{aborting}")
    assert (await response.json()) == {"message": f"Aborted '{aborting}'"}
    result = await http.get(f"/api/task/result/{aborting}", params={"timeout": "60"})
    assert (await result.json())["result"] == "aborted"

    entries = (await (await http.get("/api/audit")).json())["entries"]
    apply_entry = next(e for e in entries if e["action"] == "task.apply" and e["status"] == 200)
    assert apply_entry["params"]["body"]["args"] in ([2, 3], ["bad"], [1.5])


async def test_read_only_and_credentials(stack: Stack, api: ApiFactory, state: redis.Redis) -> None:
    read_only = await api(read_only="1")
    before = state.xlen(KEYS.audit)
    for path in (
        f"/api/worker/pool/grow/{stack.hostname}",
        f"/api/worker/shutdown/{stack.hostname}",
        "/api/task/revoke/some-task",
        "/api/task/send-task/demo.app.add",
        "/api/task/apply/demo.app.add",
    ):
        response = await read_only.post(path, json={})
        assert response.status == 403, path
        assert "read only" in (await response.json())["error"]
    assert state.xlen(KEYS.audit) == before + 5  # refused calls are recorded too
    # reads still work
    assert (await read_only.get("/api/audit")).status == 200

    tokens = await api(api_tokens="rw-secret,ro-secret:ro")
    path = "/api/task/revoke/token-test"
    assert (await tokens.post(path)).status == 401
    ro = {"Authorization": "Bearer ro-secret"}
    rw = {"Authorization": "Bearer rw-secret"}
    response = await tokens.post(path, headers=ro)
    assert response.status == 403 and "read-only" in (await response.json())["error"]
    assert (await tokens.post(path, headers=rw)).status == 200
    entries = (await (await tokens.get("/api/audit", headers=ro)).json())["entries"]
    assert [(e["who"], e["status"]) for e in entries[:2]] == [
        ("token#1", 200),
        ("token#2:ro", 403),
    ]
    assert all("secret" not in str(e) for e in entries)


async def test_broker_down_is_503(stack: Stack, api: ApiFactory) -> None:
    from tests.support.servers import free_port

    http = await api(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    response = await http.post("/api/task/revoke/anything")
    assert response.status == 503
    assert "broker" in (await response.json())["error"]
    response = await http.post(f"/api/worker/pool/grow/{stack.hostname}")
    assert response.status == 503
    entries = (await (await http.get("/api/audit", params={"limit": "2"})).json())["entries"]
    assert [e["status"] for e in entries] == [503, 503]


async def test_shutdown_turns_worker_offline(stack: Stack, api: ApiFactory) -> None:
    hostname = f"doomed-{uuid.uuid4().hex[:6]}@test"
    w = celery_worker(
        stack.broker_url, stack.logs / "doomed.log", hostname, pool="threads", concurrency=2
    )
    try:
        await asyncio.to_thread(wait_worker_up, stack.broker_url, hostname)
        http = await api()

        async def status() -> Any:
            response = await http.get("/api/workers", params={"status": "1"})
            return (await response.json()).get(hostname)

        await eventually(status, message="worker online in Pollen")
        response = await http.post(f"/api/worker/shutdown/{hostname}")
        assert (await response.json()) == {"message": "Shutting down!"}
        await eventually(lambda: _eq(status(), False), message="worker offline in Pollen")
        await asyncio.to_thread(w.proc.wait, 20)
        assert not w.alive()
    finally:
        w.stop()


async def test_control_on_rabbitmq(
    stack: Stack, api: ApiFactory, amqp_url: str, state: redis.Redis
) -> None:
    """The same calls on RabbitMQ; the worker is known from the enabler's inspect answers."""
    from tests.support.cluster import enabler, inspect_data, running
    from tests.support.servers import wait_for

    hostname = f"rabbit-{uuid.uuid4().hex[:6]}@test"
    namespace = "ctlamqp"
    keys = KEYS.__class__(namespace)
    en = enabler(
        amqp_url, stack.state_url, stack.logs / "amqp-enabler.log", namespace, inspect_interval="2"
    )
    w = celery_worker(
        amqp_url,
        stack.logs / "rabbit.log",
        hostname,
        pool="threads",
        concurrency=2,
        env={"DEMO_RESULT_BACKEND": stack.backend_url},
    )
    with running(en, w):
        await asyncio.to_thread(
            wait_for,
            lambda: "registered" in inspect_data(state, keys, hostname),
            30,
            0.2,
            "the RabbitMQ worker inspected",
        )
        http = await api(broker_url=amqp_url, namespace=namespace)
        response = await http.post(
            "/api/task/rate-limit/demo.app.mul", data={"workername": hostname, "ratelimit": "3/s"}
        )
        assert response.status == 200, await response.text()
        response = await http.post("/api/task/apply/demo.app.mul", json={"args": [3, 4]})
        assert (await response.json())["result"] == 12
        response = await http.post(f"/api/worker/pool/grow/{hostname}")
        assert response.status == 403  # the threads pool cannot grow: the worker says why
        entries = (await (await http.get("/api/audit")).json())["entries"]
        assert [e["action"] for e in entries] == [
            "worker.pool_grow",
            "task.apply",
            "task.rate_limit",
        ]
