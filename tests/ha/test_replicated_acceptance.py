"""A 202 means two nodes hold the batch: WAIT after acceptance and after a replay.

Real processes: a Redis primary, one replica, three Sentinels and gunicorn configured with them
(BROKER_MIN_REPLICAS 1 by default). The replica is cut off from the primary (REPLICAOF an
address where nothing listens) and joined again.
"""

from __future__ import annotations

import time

import redis
import requests

from scripts.services import ReplicatedRedis
from scripts.stack import Api
from scripts.stack import wait_until
from tasks.pending import IDEMPOTENCY_KEY
from tasks.pending import read_pending
from tasks.pending import read_state
from tests.helpers import make_event


def post(url: str, key: str, topic: str) -> requests.Response:
    body = [make_event(f"{topic}-{i}", topic=topic) for i in range(5)]
    return requests.post(f"{url}/publish", json=body, headers={"Idempotency-Key": key}, timeout=10)


def test_no_202_until_the_replica_holds_the_batch_and_a_replay_waits_too(
    api: Api, cluster: ReplicatedRedis, ha_clean: None
) -> None:
    primary = cluster.primary()
    [replica_node] = [node for node in cluster.nodes if node is not primary]
    with (
        redis.Redis(port=primary.port) as client,
        redis.Redis(port=replica_node.port) as replica,
    ):
        assert post(api.url, "in-sync", "first").status_code == 202
        # WAIT alone: with min-replicas-to-write the primary would refuse the write
        # itself (NOREPLICAS, also a 503) as soon as its replica is gone.
        client.config_set("min-replicas-to-write", 0)

        replica.execute_command("REPLICAOF", "127.0.0.1", "1")
        began = time.monotonic()
        refused = post(api.url, "one-node", "second")
        took = time.monotonic() - began
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"]
        # Refused after BROKER_WAIT_TIMEOUT (250 ms), not after a client timeout.
        assert took < 2, took
        # The acceptance and its record are on the primary: the request stays idempotent.
        assert client.hlen(IDEMPOTENCY_KEY) == 2
        assert len(read_pending(client)) == 2

        # The replay finds the record, but the replica still lacks it: no 202 either.
        again = post(api.url, "one-node", "second")
        assert again.status_code == 503, again.text

        replica.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
        wait_until(lambda: read_state(replica).seq == read_state(client).seq, timeout=20)
        replayed = post(api.url, "one-node", "second")
        assert replayed.status_code == 202, replayed.text
        assert replayed.headers.get("Idempotent-Replayed") == "true"
        # Accepted once: the batch the first (refused) attempt wrote.
        assert len(read_pending(client)) == 2
        assert replayed.json()["batch_id"] in read_pending(client)
        assert read_state(client).seq == 2

        client.config_set("min-replicas-to-write", 1)
        replica.execute_command("REPLICAOF", "127.0.0.1", "1")
        # With min-replicas-to-write the primary refuses outright: 503, nothing written.
        refused = post(api.url, "refused", "third")
        assert refused.status_code == 503, refused.text
        assert client.hlen(IDEMPOTENCY_KEY) == 2
        replica.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
