"""deploy/compose.ha.yml against a real Docker engine: each primary's container killed.

Runs last (pytest takes a directory's modules in name order), on the stack the other modules
leave running; alone, it brings the stack up itself. The overlay's PostgreSQL nodes first
refuse the single node's data directory, so the plain stack is taken down with its volumes and
the overlay brought up from empty ones: a Redis replica and three Sentinels, a pg_auto_failover
monitor, the database's primary and its synchronous standby, and the API, workers and beat
pointed at all of them.

Broker: 200 events are accepted, the Redis primary's container is SIGKILLed, and a publisher
keeps sending 300 more (with repeats) through the proxy, each request retried with its
Idempotency-Key until it is answered 202. The Sentinels promote the replica; the killed node,
started again once they have (as a supervisor would), becomes its replica, and the new primary
accepts again (with one replica, acceptance waits for that: docs/operations.md).

Database: 200 more are stored, the PostgreSQL primary's container is SIGKILLed (its keeper with
it) while the publisher sends 300 more; the monitor promotes the standby, the workers store on
it, and the killed node started again rejoins as its standby. Both times nothing answered 202
is lost or counted twice, and the rows equal /stats. The stack is then taken down with its
volumes (the overlay's included).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from scripts.stack import wait_until
from tests.compose.harness import Stack
from tests.compose.harness import event
from tests.compose.harness import record

pytestmark = pytest.mark.incremental

OVERLAY = ("-f", "docker-compose.yml", "-f", "deploy/compose.ha.yml")
TOPIC = "compose-ha"
# The Redis nodes' fixed addresses (deploy/compose.ha.yml's defaults): Sentinels name them so.
PRIMARY, REPLICA = "172.30.240.251", "172.30.240.252"
BEFORE = 200  # accepted before each kill
DURING = 30  # requests of 10 events sent from each kill on
REPEATS = 3  # the first requests carry the same 10 events (new keys): 20 duplicates
# pgaf-member.sh's exit status when its volume holds docker-compose.yml's database.
REFUSED = 78
DATA = "/var/lib/postgresql/data"  # the nodes' volume


EVERY_PROFILE = ("--profile", "publish", "--profile", "monitoring")


def ha(stack: Stack, *args: str, timeout: float = 300) -> str:
    return stack.compose(*OVERLAY, *args, timeout=timeout)


def primary(stack: Stack) -> str:
    """Return the host the Sentinels name the primary (asking sentinel-1)."""
    out = ha(
        stack,
        "exec", "-T", "sentinel-1", "redis-cli", "-p", "26379",
        "sentinel", "get-master-addr-by-name", "aggregator",
    )  # fmt: skip
    return out.split()[0]


def role(stack: Stack, service: str) -> str:
    out = ha(stack, "exec", "-T", service, "redis-cli", "info", "replication")
    return next(line.split(":")[1].strip() for line in out.splitlines() if line.startswith("role:"))


def formation(stack: Stack) -> dict[str, tuple[str, str]]:
    """Each database node's (reported state, goal state), as the monitor has them."""
    query = "SELECT nodename, reportedstate, goalstate FROM pgautofailover.node ORDER BY nodeid"
    out = ha(
        stack,
        "exec", "-T", "postgres-monitor",
        "psql", "-X", "-h", "/var/run/postgresql", "-d", "pg_auto_failover", "-tA", "-F", " ",
        "-c", query,
    )  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {name: (reported, goal) for name, reported, goal in rows}


def settled_formation(stack: Stack, primary_node: str, standby_node: str) -> bool:
    return formation(stack) == {
        primary_node: ("primary", "primary"),
        standby_node: ("secondary", "secondary"),
    }


def rows_on(stack: Stack, service: str) -> int:
    """Count the events table's rows on one database node (a standby answers reads too)."""
    out = ha(
        stack,
        "exec", "-T", service,
        "psql", "-X", "-h", "/var/run/postgresql", "-U", "aggregator", "-d", "aggregator",
        "-tAc", "SELECT count(*) FROM events",
    )  # fmt: skip
    return int(out.strip())


class Sender(threading.Thread):
    """Publishes DURING requests through the proxy, each retried with its key until 202."""

    def __init__(self, stack: Stack, prefix: str) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.prefix = prefix
        self.answers: list[tuple[float, int]] = []  # (time, status or 0 for no answer)
        self.accepted = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            for n in range(DURING):
                ids = (
                    [f"{self.prefix}-d-{n}-{k}" for k in range(10)]
                    if n >= REPEATS
                    else [f"{self.prefix}-b-{k}" for k in range(10)]
                )
                self.send([event(i, TOPIC) for i in ids], key=uuid.uuid4().hex)
        except Exception as exc:  # The test fails saying so.
            self.error = repr(exc)

    def send(self, batch: list[dict[str, Any]], key: str) -> None:
        deadline = time.monotonic() + 120
        headers = {**self.stack.auth(), "Idempotency-Key": key}
        while time.monotonic() < deadline:
            try:
                status = requests.post(
                    f"{self.stack.url}/publish", json=batch, headers=headers, timeout=10
                ).status_code
            except requests.RequestException:
                status = 0
            self.answers.append((time.monotonic(), status))
            if status == 202:
                self.accepted += len(batch)
                return
            assert status in (0, 502, 503, 504), status
            time.sleep(0.2)
        raise TimeoutError(f"batch {key} not accepted within 120 s")

    def refusals(self, since: float) -> dict[str, float]:
        refused = [at for at, status in self.answers if status != 202]
        last = max((at for at, _ in self.answers), default=since)
        return {
            "answers_not_202": len(refused),
            "seconds_until_last_refusal": round(max(refused, default=since) - since, 1),
            "seconds_until_all_accepted": round(last - since, 1),
        }


def publish_before(stack: Stack, prefix: str) -> None:
    batch = [event(f"{prefix}-a-{n}", TOPIC) for n in range(BEFORE)]
    for start in range(0, BEFORE, 50):
        response = requests.post(
            f"{stack.url}/publish",
            json=batch[start : start + 50],
            headers=stack.auth(),
            timeout=30,
        )
        assert response.status_code == 202, response.text


def assert_counted_once(stack: Stack, received: int, stored: int) -> dict[str, Any]:
    """Every event answered 202 since the counts were taken is counted once, none lost."""
    during = DURING * 10
    figures = stack.settled(received + BEFORE + during, timeout=180)
    assert figures["total_received_queued"] == received + BEFORE + during
    assert figures["unique_processed_db"] == stored + BEFORE + during - (REPEATS - 1) * 10
    assert figures["broker_data_loss"]["detected"] == 0, figures["broker_data_loss"]
    return figures


@pytest.fixture(scope="module")
def overlay_up(stack: Stack) -> Iterator[None]:
    if not (stack.directory / ".env").exists():  # this module alone
        stack.readme("cp .env.example .env && $EDITOR .env")
    stack.fill_ha_secrets()  # what the overlay's section asks before its `up`
    started = time.monotonic()
    ha(stack, "build", timeout=900)
    record("ha overlay: build (the pg_auto_failover image)", started)
    yield
    stack.compose(*OVERLAY, *EVERY_PROFILE, "down", "-v", "--remove-orphans")


def test_the_overlays_database_refuses_the_single_nodes_data(
    stack: Stack, overlay_up: None
) -> None:
    if not stack.containers():  # this module alone: give the volume a single node's data
        stack.compose("up", "-d", "--wait", "postgres", timeout=600)
    stack.compose("stop", "postgres")
    done = stack.shell(
        "docker compose -f docker-compose.yml -f deploy/compose.ha.yml run --rm --no-deps postgres",
        timeout=300,
    )
    assert done.returncode == REFUSED, (done.returncode, done.stdout, done.stderr)
    assert "holds a single-node database" in done.stderr, done.stderr
    assert "pg_dump" in done.stderr, done.stderr
    # Nothing was made beside the single node's data.
    listed = ha(stack, "run", "--rm", "--no-deps", "--entrypoint", "ls", "postgres", DATA)
    assert "PG_VERSION" in listed.split() and "pgdata" not in listed.split(), listed


def test_the_overlay_brings_up_a_replica_sentinels_and_a_database_formation(
    stack: Stack, overlay_up: None
) -> None:
    stack.compose(*EVERY_PROFILE, "down", "-v", "--remove-orphans")
    started = time.monotonic()
    ha(stack, "up", "-d", "--wait", timeout=900)
    record("ha overlay: up -d --wait from empty volumes", started)
    services = (
        "redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3",
        "postgres-monitor", "postgres", "postgres-standby", "aggregator", "worker", "beat",
    )  # fmt: skip
    for service in services:
        (row,) = stack.running(service)
        assert row["Health"] == "healthy", row
    assert primary(stack) == PRIMARY
    assert role(stack, "redis-replica") == "slave"
    # The standby is in sync (the primary waits for it) once the monitor says both are set.
    wait_until(lambda: settled_formation(stack, "postgres", "postgres-standby"), timeout=120)
    sync = ha(stack, "exec", "-T", "postgres", "psql", "-X", "-h", "/var/run/postgresql",
              "-d", "aggregator", "-tAc", "SHOW synchronous_standby_names")  # fmt: skip
    assert sync.strip().startswith("ANY 1 ("), sync
    environment = ha(stack, "exec", "-T", "aggregator", "env")
    assert "BROKER_SENTINELS=sentinel-1:26379,sentinel-2:26379,sentinel-3:26379" in environment
    assert "target_session_attrs=read-write" in environment


def test_killing_the_broker_primary_fails_over_and_loses_nothing(
    stack: Stack, overlay_up: None
) -> None:
    received = stack.stats()["total_received_queued"]
    stored = stack.stats()["unique_processed_db"]
    publish_before(stack, "broker")
    killed_at = time.monotonic()
    ha(stack, "kill", "redis")
    sender = Sender(stack, "broker")
    sender.start()
    wait_until(lambda: primary(stack) == REPLICA, timeout=60, interval=0.2)
    failover_s = time.monotonic() - killed_at
    # As a supervisor would: the promoted node accepts nothing alone (BROKER_MIN_REPLICAS
    # 1, min-replicas-to-write 1) until the old one is back, as its replica.
    ha(stack, "start", "redis")
    sender.join(timeout=240)
    assert not sender.is_alive() and sender.error is None, sender.error
    assert_counted_once(stack, received, stored)
    print(
        "ha overlay, broker:",
        {"seconds_to_failover": round(failover_s, 1), **sender.refusals(killed_at)},
    )
    record("ha overlay: Redis primary killed, replica promoted, everything stored once", killed_at)


def test_the_killed_broker_node_started_again_is_the_new_primarys_replica(
    stack: Stack, overlay_up: None
) -> None:
    wait_until(lambda: role(stack, "redis") == "slave", timeout=60, interval=0.5)
    assert primary(stack) == REPLICA
    # Accepting on the new primary, durable on both nodes again.
    response = requests.post(
        f"{stack.url}/publish", json=event("after-rejoin", TOPIC), headers=stack.auth(), timeout=30
    )
    assert response.status_code == 202, response.text


def test_killing_the_database_primary_fails_over_and_loses_nothing(
    stack: Stack, overlay_up: None
) -> None:
    # Everything so far stored (on both nodes: the standby is synchronous) before the kill.
    figures = stack.settled(stack.stats()["total_received_queued"])
    received, stored = figures["total_received_queued"], figures["unique_processed_db"]
    publish_before(stack, "database")
    killed_at = time.monotonic()
    ha(stack, "kill", "postgres")
    sender = Sender(stack, "database")
    sender.start()
    # pg_auto_failover's default timers: the monitor waits for the dead primary's demote
    # timeout before it promotes (docs/operations.md, "Timers").
    wait_until(
        lambda: (
            formation(stack).get("postgres-standby", ("", ""))[0] in ("wait_primary", "primary")
        ),
        timeout=180,
        interval=1,
    )
    failover_s = time.monotonic() - killed_at
    sender.join(timeout=240)
    assert not sender.is_alive() and sender.error is None, sender.error
    figures = assert_counted_once(stack, received, stored)
    stored_s = time.monotonic() - killed_at
    assert rows_on(stack, "postgres-standby") == figures["unique_processed_db"]
    print(
        "ha overlay, database:",
        {
            "seconds_to_promotion": round(failover_s, 1),
            "seconds_until_all_stored": round(stored_s, 1),
            **sender.refusals(killed_at),
        },
    )
    record("ha overlay: PostgreSQL primary killed, standby promoted, stored once", killed_at)


def test_the_killed_database_node_started_again_is_the_new_primarys_standby(
    stack: Stack, overlay_up: None
) -> None:
    started = time.monotonic()
    ha(stack, "start", "postgres")
    wait_until(lambda: settled_formation(stack, "postgres-standby", "postgres"), timeout=300)
    record("ha overlay: the old PostgreSQL primary back as the standby", started)
    response = requests.post(
        f"{stack.url}/publish",
        json=event("after-db-rejoin", TOPIC),
        headers=stack.auth(),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    figures = stack.settled(stack.stats()["total_received_queued"])
    # Synchronous again: the rejoined node has every row the new primary has.
    assert rows_on(stack, "postgres") == rows_on(stack, "postgres-standby")
    assert rows_on(stack, "postgres") == figures["unique_processed_db"]
