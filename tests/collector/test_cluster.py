"""The collector on a real three-node Redis Cluster gives the same state as on one Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.collector.writer import Writer
from shared.keys import Keys, key_slot
from shared.settings import Settings, load
from tests.support import readback
from tests.support.lifecycles import cluster_stream, with_local_received
from tests.support.servers import RedisCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


def _settings(url: str, cluster_mode: bool) -> Settings:
    return load(
        {
            "POLLEN_REDIS_URL": url,
            "POLLEN_NAMESPACE": "cl",
            "POLLEN_SHARDS": "3",
            "POLLEN_REDIS_CLUSTER": "1" if cluster_mode else "0",
        }
    )


def snapshot(client: Any, keys: Keys, uuids: set[str], hosts: set[str]) -> dict[str, Any]:
    tasks = {u: readback.task(client, keys, u) for u in sorted(uuids)}
    workers = {h: readback.worker(client, keys, h, 1_790_000_100.0) for h in sorted(hosts)}
    return {"tasks": tasks, "workers": workers, "names": readback.task_names(client, keys)}


def test_shards_land_on_different_nodes(cluster: RedisCluster) -> None:
    client = redis.cluster.RedisCluster.from_url(cluster.url)
    keys = Keys("cl", 3)
    nodes = {client.get_node_from_key(s.stream).name for s in keys.all_shards}
    assert len(nodes) == 3
    for shard in keys.all_shards:
        assert (
            key_slot(shard.task("x"))
            == key_slot(shard.by_state("SUCCESS"))
            == client.keyslot(shard.stream)
        )
    client.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=cluster_stream(), data=st.data())
def test_cluster_state_equals_single_redis(
    cluster: RedisCluster,
    r: redis.Redis,
    redis_server: Any,
    events: list[dict[str, Any]],
    data: st.DataObject,
) -> None:
    cluster_client = redis.cluster.RedisCluster.from_url(cluster.url)
    cluster_client.flushall()
    r.flushall()
    single = Writer(r, _settings(redis_server.url, False))
    clustered = Writer(cluster_client, _settings(cluster.url, True))
    events = with_local_received(events)
    order = data.draw(st.permutations(events))
    readback.apply(single, events)
    readback.apply(clustered, order)
    uuids = {e["uuid"] for e in events if "uuid" in e}
    hosts = {e["hostname"] for e in events if not e["type"].startswith("task-sent")}
    keys = Keys("cl", 3)
    assert snapshot(cluster_client, keys, uuids, hosts) == snapshot(r, keys, uuids, hosts)
    cluster_client.close()
