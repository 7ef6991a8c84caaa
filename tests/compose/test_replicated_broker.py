"""deploy/compose.ha.yml against a real Docker engine: the broker's primary container killed.

Runs last (pytest takes a directory's modules in name order), on the stack the other modules
leave running; alone, it brings the stack up itself. The overlay's `up` adds a replica and
three Sentinels and restarts the API and workers pointed at them; then 200 events are
accepted, the primary's container is SIGKILLed, and a publisher keeps sending 300 more
(with repeats) through the proxy, each request retried with its Idempotency-Key until it
is answered 202. The Sentinels promote the replica; the killed node, started again once
they have (as a supervisor would), becomes its replica, and the new primary accepts again
(with one replica, acceptance waits for that: docs/operations.md). Nothing answered 202 is
lost or counted twice. The stack is then taken down
with its volumes (the overlay's included).
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
# The nodes' fixed addresses (deploy/compose.ha.yml's defaults): Sentinels name them so.
PRIMARY, REPLICA = "172.30.240.251", "172.30.240.252"
BEFORE = 200  # accepted before the kill
DURING = 30  # requests of 10 events sent from the kill on
REPEATS = 3  # the first requests carry the same 10 events (new keys): 20 duplicates


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


class Sender(threading.Thread):
    """Publishes DURING requests through the proxy, each retried with its key until 202."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.answers: list[tuple[float, int]] = []  # (time, status or 0 for no answer)
        self.accepted = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            for n in range(DURING):
                ids = (
                    [f"d-{n}-{k}" for k in range(10)]
                    if n >= REPEATS
                    else [f"b-{k}" for k in range(10)]
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


@pytest.fixture(scope="module")
def overlay_up(stack: Stack) -> Iterator[None]:
    if not (stack.directory / ".env").exists():  # this module alone
        stack.readme("cp .env.example .env && $EDITOR .env")
    started = time.monotonic()
    ha(stack, "up", "--build", "-d", "--wait", timeout=900)
    record("ha overlay: up -d --wait (replica, 3 Sentinels, API and workers on them)", started)
    yield
    stack.compose(*OVERLAY, "--profile", "monitoring", "down", "-v", "--remove-orphans")


def test_the_overlay_brings_up_a_replica_and_three_sentinels_that_name_the_primary(
    stack: Stack, overlay_up: None
) -> None:
    for service in ("redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"):
        (row,) = stack.running(service)
        assert row["Health"] == "healthy", row
    assert primary(stack) == PRIMARY
    assert role(stack, "redis-replica") == "slave"
    environment = ha(stack, "exec", "-T", "aggregator", "env")
    assert "BROKER_SENTINELS=sentinel-1:26379,sentinel-2:26379,sentinel-3:26379" in environment


def test_killing_the_primary_fails_over_and_loses_nothing(stack: Stack, overlay_up: None) -> None:
    received = stack.stats()["total_received_queued"]
    stored = stack.stats()["unique_processed_db"]
    before = [event(f"a-{n}", TOPIC) for n in range(BEFORE)]
    for start in range(0, BEFORE, 50):
        response = requests.post(
            f"{stack.url}/publish",
            json=before[start : start + 50],
            headers=stack.auth(),
            timeout=30,
        )
        assert response.status_code == 202, response.text
    killed_at = time.monotonic()
    ha(stack, "kill", "redis")
    sender = Sender(stack)
    sender.start()
    wait_until(lambda: primary(stack) == REPLICA, timeout=60, interval=0.2)
    failover_s = time.monotonic() - killed_at
    # As a supervisor would: the promoted node accepts nothing alone (BROKER_MIN_REPLICAS
    # 1, min-replicas-to-write 1) until the old one is back, as its replica.
    ha(stack, "start", "redis")
    sender.join(timeout=240)
    assert not sender.is_alive() and sender.error is None, sender.error
    during = DURING * 10
    figures = stack.settled(received + BEFORE + during, timeout=120)
    # Every event answered 202 is counted once: the repeats as duplicates, none lost.
    assert figures["total_received_queued"] == received + BEFORE + during
    assert figures["unique_processed_db"] == stored + BEFORE + during - (REPEATS - 1) * 10
    assert figures["broker_data_loss"]["detected"] == 0, figures["broker_data_loss"]
    refused = [at for at, status in sender.answers if status != 202]
    accepting_again = max((at for at, _ in sender.answers), default=killed_at) if refused else 0
    print(
        "ha overlay:",
        {
            "seconds_to_failover": round(failover_s, 1),
            "answers_not_202": len(refused),
            "seconds_until_last_refusal": round(max(refused, default=killed_at) - killed_at, 1),
            "seconds_until_all_accepted": round(accepting_again - killed_at, 1),
        },
    )
    record("ha overlay: primary killed, replica promoted, everything stored once", killed_at)


def test_the_killed_node_started_again_is_the_new_primarys_replica(
    stack: Stack, overlay_up: None
) -> None:
    wait_until(lambda: role(stack, "redis") == "slave", timeout=60, interval=0.5)
    assert primary(stack) == REPLICA
    # Accepting on the new primary, durable on both nodes again.
    response = requests.post(
        f"{stack.url}/publish", json=event("after-rejoin", TOPIC), headers=stack.auth(), timeout=30
    )
    assert response.status_code == 202, response.text
