"""Every Redis key Pollen writes is a row of the table in ``shared/keys.py``.

A whole lifecycle runs against real processes: a demo worker runs tasks that succeed, fail,
retry and send custom events, a task waits on a queue nobody consumes, a malformed event is
published, the enabler inspects and samples queues, a control call goes through the API and
is audited. Then Pollen's Redis is ``SCAN``ned and each key matched to a documented row."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import redis
from kombu import Exchange

import shared.keys
from shared.keys import Keys
from tests.support.api import Api
from tests.support.cluster import client, collector, enabler, stop_all, wait_worker_up
from tests.support.replies import raw_list
from tests.support.servers import Process, RedisServer, celery_worker, pollen_env, wait_for

NAMESPACE = "layout"
WORKER = "layout@pollen-test"
PLACEHOLDER = re.compile(r"<[^>]+>")


def documented_patterns() -> dict[str, re.Pattern[str]]:
    """Each row of the key table (``S ...`` per shard, ``<ns>:...`` global) as a regex."""
    keys = Keys(NAMESPACE)
    (shard,) = keys.all_shards
    rows: dict[str, re.Pattern[str]] = {}
    doc = shared.keys.__doc__ or ""
    # the reST tables' columns are as wide as their ``====`` rulers
    ruler = next(line for line in doc.splitlines() if line.startswith("===="))
    width = ruler.index(" ")
    for line in doc.splitlines():
        if not line.startswith(("S ", "<ns>:")):
            continue
        cell = line[:width].strip()
        head = "S " if cell.startswith("S ") else ""
        for name in cell.removeprefix("S ").split(" / "):
            literal = (shard.prefix if head else "") + name.replace("<ns>:", f"{NAMESPACE}:", 1)
            regex = ".+".join(re.escape(p) for p in PLACEHOLDER.split(literal))
            rows[head + name] = re.compile(f"^{regex}$")
    return rows


def test_the_table_is_parsed() -> None:
    rows = documented_patterns()
    assert len(rows) >= 30, sorted(rows)
    assert rows["S task:<uuid>"].match(Keys(NAMESPACE).all_shards[0].task("abc"))
    assert not rows["S task:<uuid>"].match(f"{NAMESPACE}:task:abc")


def test_every_key_written_is_documented(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    broker = f"redis://127.0.0.1:{server.port}/0"
    state = f"redis://127.0.0.1:{server.port}/1"
    settings = {"inspect_interval": "1", "queue_interval": "1", "queues": "idle"}
    processes: list[Process] = []
    api = None
    app = client(broker)
    try:
        processes.append(celery_worker(broker, tmp_path / "worker.log", WORKER))
        processes.append(collector(broker, state, tmp_path / "collector.log", NAMESPACE))
        processes.append(enabler(broker, state, tmp_path / "enabler.log", NAMESPACE, **settings))
        env = pollen_env(broker, state, NAMESPACE, result_backend="", **settings)
        api = Api(env, tmp_path / "api.log")
        wait_worker_up(broker, WORKER)
        ids = [
            app.send_task("demo.app.add", (1, 2)).id,
            app.send_task("demo.app.fail").id,
            app.send_task("demo.app.flaky", (1,)).id,
            app.send_task("demo.app.progress", (2,)).id,
        ]
        app.send_task("demo.app.add", (0, 0), queue="idle")  # waits: nobody consumes "idle"
        with app.connection_for_write() as conn:
            events = Exchange("celeryev", type="fanout")  # as celery declares it on Redis
            conn.Producer().publish(
                b"{not json",
                exchange=events,
                declare=[events],
                routing_key="task.bad",
                content_type="application/json",
                content_encoding="utf-8",
            )
        request = urllib.request.Request(
            f"{api.url}/api/worker/queue/add-consumer/{WORKER}?queue=extra", b"", method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert "extra" in json.loads(resp.read())["message"]
        r = redis.Redis(port=server.port, db=1)
        keys = Keys(NAMESPACE)

        def lifecycle_done() -> bool:
            tasks = api.data("/api/tasks?limit=100") if api is not None else {}
            states = {i: tasks.get(i, {}).get("state") for i in ids}
            wanted = (keys.inspect(WORKER), keys.queues, keys.queues_history, keys.audit,
                      keys.malformed, keys.enabler_lease)  # fmt: skip
            missing = [k for k in wanted if not r.exists(k)]
            done = set(states.values()) <= {"SUCCESS", "FAILURE"}
            assert done and not missing, (states, missing)  # wait_for reports the last
            return True

        wait_for(lifecycle_done, timeout=90, message="tasks, inspect, queues, audit, malformed")
        rows = documented_patterns()
        undocumented = sorted(
            key
            for key in (k.decode() for k in raw_list(list(r.scan_iter(count=1000))))
            if not any(p.match(key) for p in rows.values())
        )
        assert not undocumented, f"keys missing from shared/keys.py: {undocumented}"
        # and the lifecycle reached the layout's every corner that it should
        used = {
            row
            for row, p in rows.items()
            if any(p.match(k.decode()) for k in raw_list(list(r.scan_iter(count=1000))))
        }
        for row in ("S task:<uuid>", "S states", "S worker:<hostname>", "S minute:<epoch minute>",
                    "<ns>:inspect:<hostname>", "<ns>:audit", "<ns>:collector:<id>"):  # fmt: skip
            assert row in used, (row, sorted(used))
        r.close()
    finally:
        app.close()
        if api is not None:
            api.stop()
        stop_all(*processes)
        server.stop()
