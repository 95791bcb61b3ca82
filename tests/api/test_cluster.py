"""The API over a real three-node Redis Cluster (``POLLEN_REDIS_CLUSTER=1``, ``POLLEN_SHARDS=3``)
answers as over one Redis: both are seeded with the same events through the collector's write
path, and every listing (filters, sorts, pages, searches, cursor pages), every task's info, the
task types, the workers and the live WebSocket relay must be the same."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import redis
import redis.cluster

from services.collector.writer import Writer
from shared.keys import Keys
from shared.settings import load
from tests.api.test_flower_compat import FILTERS, SEARCHES
from tests.support import readback
from tests.support.api import Api, api_env, clear_namespace, seed
from tests.support.dataset import task_events
from tests.support.servers import RedisCluster, RedisServer

NAMESPACE = "apicl"
EVENTS = task_events(300, seed=31)
LIVE = task_events(30, seed=32)
TASK_IDS = sorted({e["uuid"] for e in EVENTS if "uuid" in e})


def seed_cluster(cluster: RedisCluster, events: list[dict[str, Any]]) -> None:
    settings = load(
        {
            "POLLEN_REDIS_URL": cluster.url,
            "POLLEN_REDIS_CLUSTER": "1",
            "POLLEN_NAMESPACE": NAMESPACE,
            "POLLEN_SHARDS": "3",
        }
    )
    client = redis.cluster.RedisCluster.from_url(cluster.url)
    try:
        writer = Writer(client, settings)
        for i in range(0, len(events), 50):
            readback.apply(writer, events[i : i + 50], now=time.time())
    finally:
        client.close()


@pytest.fixture(scope="module")
def apis(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Api, Api, RedisCluster]]:
    """An API over the cluster and one over the single Redis, seeded alike."""
    workdir = tmp_path_factory.mktemp("apicluster")
    cluster = RedisCluster(workdir / "cluster").start()
    started: list[Api] = []
    try:
        client = redis.cluster.RedisCluster.from_url(cluster.url)
        nodes = {client.get_node_from_key(s.stream).name for s in Keys(NAMESPACE, 3).all_shards}
        client.close()
        assert len(nodes) == 3, "the shards should be on three nodes"
        seed_cluster(cluster, EVENTS)
        clear_namespace(redis_server, NAMESPACE)
        seed(redis_server, NAMESPACE, EVENTS)
        env = api_env(redis_server, NAMESPACE, redis_url=cluster.url, redis_cluster="1", shards="3")
        started.append(Api(env, workdir / "api-cluster.log"))
        started.append(Api(api_env(redis_server, NAMESPACE), workdir / "api-single.log"))
        yield started[0], started[1], cluster
    finally:
        for api in started:
            api.stop()
        cluster.stop()
        clear_namespace(redis_server, NAMESPACE)


def queries() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for sort_by in (None, "received", "-started", "name", "-name", "state", "-state"):
        out += [{**f, "sort_by": sort_by} for f in FILTERS]
    out += [{"search": s} for s in SEARCHES]
    out += [{"search": s, "sort_by": "-received"} for s in SEARCHES[:6]]
    for offset, limit in ((0, 1), (7, 10), (95, 50), (290, 50), (1000, 5)):
        out += [
            {"offset": offset, "limit": limit, "sort_by": sort_by, **f}
            for sort_by in (None, "received", "name")
            for f in ({}, {"state": "SUCCESS"}, {"taskname": "tasks.add"})
        ]
    return out


def test_listings_equal_single_redis(apis: tuple[Api, Api, RedisCluster]) -> None:
    cluster_api, single_api, _ = apis
    compared = 0
    every = queries()
    for query in every:
        params = {"limit": 1000, **{k: v for k, v in query.items() if v is not None}}
        path = "/api/tasks?" + urlencode(params)
        status, _, body = cluster_api.get(path)
        expected_status, _, expected = single_api.get(path)
        assert (status, expected_status) == (200, 200), (path, body[:300])
        assert json.loads(body, object_pairs_hook=list) == json.loads(
            expected, object_pairs_hook=list
        ), path
        compared += bool(json.loads(expected))
    assert compared >= len(every) * 3 // 4  # most queries select something


def test_cursor_pages_equal_single_redis(apis: tuple[Api, Api, RedisCluster]) -> None:
    cluster_api, single_api, _ = apis
    for query in ("", "&state=SUCCESS", "&sort_by=-received", "&sort_by=name", "&search=tasks"):
        full = [u for u, _ in single_api.json(f"/api/tasks?limit=1000{query}")]
        seen: list[str] = []
        cursor = ""
        for _ in range(100):
            status, headers, body = cluster_api.get(f"/api/tasks?limit=23{query}{cursor}")
            assert status == 200, body
            seen.extend(u for u, _ in json.loads(body, object_pairs_hook=list))
            nxt = headers.get("X-Pollen-Next-Cursor")
            if not nxt:
                break
            cursor = f"&cursor={nxt}"
        assert seen == full, query


def test_task_info_types_and_workers_equal_single_redis(
    apis: tuple[Api, Api, RedisCluster],
) -> None:
    cluster_api, single_api, _ = apis
    for uuid in TASK_IDS:
        path = f"/api/task/info/{uuid}"
        assert cluster_api.json(path) == single_api.json(path), uuid
    for path in ("/api/task/types", "/api/workers?status=1", "/api/workers"):
        assert cluster_api.json(path) == single_api.json(path), path
    assert cluster_api.get("/api/task/info/no-such-task")[0] == 404
    assert cluster_api.get("/readyz")[0] == single_api.get("/readyz")[0]


async def test_live_events_over_the_cluster(
    apis: tuple[Api, Api, RedisCluster], redis_server: RedisServer
) -> None:
    """The relay subscribes on the cluster: new events reach a client, with cursors that resume
    (per shard) exactly after them."""
    cluster_api, _, cluster = apis
    # the single Redis gets the same events: the two stay alike for the other tests
    await asyncio.to_thread(seed, redis_server, NAMESPACE, LIVE)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{cluster_api.url}/api/events?type=task-*")
        await asyncio.to_thread(seed_cluster, cluster, LIVE)
        want = [e for e in LIVE if e["type"].startswith("task-")]
        got: list[Any] = []
        async with asyncio.timeout(30):
            while len(got) < len(want):
                got.append(json.loads((await ws.receive()).data))
        await ws.close()
        assert sorted((e["uuid"], e["type"]) for e in got) == sorted(
            (e["uuid"], e["type"]) for e in want
        )
        assert all(len(e["cursor"].split(",")) == 3 for e in got)
        cursor = got[9]["cursor"]
        ws = await session.ws_connect(f"{cluster_api.url}/api/events?type=task-*&since={cursor}")
        resumed: list[Any] = []
        async with asyncio.timeout(30):
            while len(resumed) < len(got) - 10:
                resumed.append(json.loads((await ws.receive()).data))
        await ws.close()
        key = [(e["stream_id"], e["uuid"], e["type"]) for e in got[10:]]
        assert sorted((e["stream_id"], e["uuid"], e["type"]) for e in resumed) == sorted(key)
