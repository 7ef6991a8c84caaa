"""Unit tests of the publisher's pure logic: planning, batching, retries, summaries, CLI."""

from collections import Counter
from datetime import datetime

import orjson
import pytest
from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import MaxRetryError
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import RequestHistory

from publisher.cli import EXIT_OK
from publisher.cli import format_summary
from publisher.cli import main
from publisher.cli import parse_config
from publisher.client import PublishConfig
from publisher.client import RequestOutcome
from publisher.client import encode_body
from publisher.client import is_ambiguous
from publisher.client import make_retry
from publisher.client import percentile
from publisher.client import summarize
from publisher.events import batched
from publisher.events import event_key
from publisher.events import plan_events
from publisher.verify import TopicTotals
from publisher.verify import compare
from publisher.verify import sum_topics

TOPICS = ["t-0", "t-1", "t-2"]


def keys_of(events):
    return [event_key(event) for event in events]


@pytest.mark.parametrize(
    ("count", "ratio", "copies"),
    [
        (1000, 0.0, 0),
        (1000, 0.1, 100),
        (1000, 0.5, 500),
        (7, 0.3, 2),
        (1, 0.0, 0),
        (0, 0.5, 0),
        (20000, 0.1, 2000),
    ],
)
def test_plan_has_exact_unique_and_duplicate_counts(count, ratio, copies):
    events = plan_events(count, ratio, TOPICS, "src", seed=1)
    assert len(events) == count
    assert len(set(keys_of(events))) == count - copies


def test_duplicate_copies_are_identical_but_separate_dicts():
    events = plan_events(500, 0.5, TOPICS, "src", seed=2)
    by_key = {}
    for event in events:
        by_key.setdefault(event_key(event), []).append(event)
    copied = [group for group in by_key.values() if len(group) > 1]
    assert copied
    for group in copied:
        assert all(event == group[0] for event in group)
        assert len({id(event) for event in group}) == len(group)
        assert len({id(event["payload"]) for event in group}) == len(group)


def test_events_have_every_field_and_an_aware_timestamp():
    events = plan_events(10, 0.0, TOPICS, "src", seed=3, run_id="abc")
    for event in events:
        assert set(event) == {"topic", "event_id", "timestamp", "source", "payload"}
        assert event["source"] == "src"
        assert event["topic"] in TOPICS
        assert event["event_id"].startswith("abc-")
        assert datetime.fromisoformat(event["timestamp"]).utcoffset() is not None
        assert isinstance(event["payload"], dict)


def test_events_spread_evenly_over_topics():
    events = plan_events(300, 0.0, TOPICS, "src", seed=4)
    assert Counter(event["topic"] for event in events) == {topic: 100 for topic in TOPICS}


def test_copies_are_shuffled_into_the_first_half():
    events = plan_events(1000, 0.5, TOPICS, "src", seed=5)
    seen = set()
    copy_positions = []
    for position, key in enumerate(keys_of(events)):
        if key in seen:
            copy_positions.append(position)
        seen.add(key)
    assert len(copy_positions) == 500
    assert min(copy_positions) < 250


def test_same_seed_and_run_id_give_the_same_plan():
    first = plan_events(200, 0.3, TOPICS, "src", seed=6, run_id="r")
    second = plan_events(200, 0.3, TOPICS, "src", seed=6, run_id="r")
    assert keys_of(first) == keys_of(second)


def test_runs_without_run_id_never_share_keys():
    first = plan_events(50, 0.0, TOPICS, "src", seed=7)
    second = plan_events(50, 0.0, TOPICS, "src", seed=7)
    assert not set(keys_of(first)) & set(keys_of(second))


@pytest.mark.parametrize(
    ("count", "ratio", "topics"),
    [(-1, 0.1, TOPICS), (10, 1.0, TOPICS), (10, -0.1, TOPICS), (10, 0.1, []), (1, 0.6, TOPICS)],
)
def test_plan_rejects_impossible_requests(count, ratio, topics):
    with pytest.raises(ValueError):
        plan_events(count, ratio, topics, "src")


@pytest.mark.parametrize(
    ("count", "size", "sizes"),
    [(1001, 500, [500, 500, 1]), (3, 1, [1, 1, 1]), (5, 10, [5]), (0, 5, []), (1000, 1000, [1000])],
)
def test_batched_sizes_and_order(count, size, sizes):
    events = plan_events(count, 0.0, TOPICS, "src", seed=8)
    batches = batched(events, size)
    assert [len(batch) for batch in batches] == sizes
    assert [event for batch in batches for event in batch] == events


def test_batched_rejects_size_zero():
    with pytest.raises(ValueError):
        batched([], 0)


def test_single_event_is_encoded_as_an_object_and_batches_as_arrays():
    events = plan_events(2, 0.0, TOPICS, "src", seed=9)
    assert orjson.loads(encode_body(events[:1], as_object=True)) == events[0]
    assert orjson.loads(encode_body(events[:1], as_object=False)) == events[:1]
    assert orjson.loads(encode_body(events, as_object=False)) == events
    with pytest.raises(ValueError):
        encode_body(events, as_object=True)


def attempt(error=None, status=None):
    return RequestHistory("POST", "/publish", error, status, None)


@pytest.mark.parametrize(
    ("history", "ambiguous"),
    [
        (attempt(error=NewConnectionError(None, "refused")), False),
        (attempt(error=ConnectTimeoutError("connect timed out")), False),
        (attempt(error=ReadTimeoutError(None, "/publish", "read timed out")), True),
        (attempt(error=ProtocolError("Connection aborted.")), True),
        (attempt(status=429), False),
        (attempt(status=503), False),
        (attempt(status=502), True),
        (attempt(status=504), True),
    ],
)
def test_only_attempts_that_may_have_reached_the_api_are_ambiguous(history, ambiguous):
    assert is_ambiguous(history) is ambiguous


def test_retry_policy_retries_posts_on_overload_but_not_on_bad_input():
    retry = make_retry(8)
    assert retry.total == 8
    assert retry.raise_on_status is False
    assert retry.respect_retry_after_header is True
    for status in (429, 502, 503, 504):
        assert retry.is_retry("POST", status, has_retry_after=True)
    for status in (400, 401, 413, 415, 422, 500):
        assert not retry.is_retry("POST", status, has_retry_after=True)


def test_retry_log_survives_max_retry_error():
    retry = make_retry(1)
    timeout = ReadTimeoutError(None, "/publish", "read timed out")
    second = retry.increment("POST", "/publish", error=timeout)
    with pytest.raises(MaxRetryError):
        second.increment("POST", "/publish", error=ProtocolError("Connection aborted."))
    assert len(retry.log) == 2
    assert all(is_ambiguous(entry) for entry in retry.log)


def test_percentile_uses_nearest_rank():
    values = [float(n) for n in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def ev(topic, event_id):
    return {"topic": topic, "event_id": event_id}


def test_summary_counts_sent_unique_duplicates_errors_and_ambiguity():
    outcomes = [
        # Accepted; a duplicate inside the batch.
        RequestOutcome([ev("a", "1"), ev("a", "2"), ev("a", "1")], "202", True, 0, 0.010),
        # Accepted after one ambiguous attempt; duplicates a batch above.
        RequestOutcome([ev("a", "2"), ev("b", "3")], "202", True, 1, 0.030),
        # Failed for good, definitely not accepted.
        RequestOutcome([ev("b", "4")], "422", False, 0, 0.020, "HTTP 422: bad"),
        # Failed after two ambiguous attempts; key 1 was accepted elsewhere, key 5 was not.
        RequestOutcome([ev("a", "1"), ev("b", "5")], "ProtocolError", False, 2, 0.040, "x"),
    ]
    summary = summarize(9, outcomes, elapsed=2.0, topics=["a", "b"])
    assert summary.planned == 9
    assert summary.sent == 5
    assert summary.unique == 3
    assert summary.duplicates == 2
    assert summary.errors == 2
    assert summary.failed_events == 3
    assert summary.ambiguous == 2 * 1 + 2 * 2
    assert summary.uncertain_unique == 1
    assert summary.requests == 4
    assert summary.events_per_second == 2.5
    assert summary.latency_p50_ms == 20.0
    assert summary.latency_p99_ms == 40.0
    assert summary.latency_max_ms == 40.0
    assert summary.statuses == {"202": 2, "422": 1, "ProtocolError": 1}
    assert summary.first_error == "HTTP 422: bad"
    assert summary.as_dict()["topics"] == ["a", "b"]
    assert orjson.loads(orjson.dumps(summary.as_dict()))["sent"] == 5


def test_with_idempotency_keys_only_requests_never_answered_202_stay_uncertain():
    outcomes = [
        # Accepted after two ambiguous attempts: the key made them one acceptance.
        RequestOutcome([ev("a", "1"), ev("a", "2")], "202", True, 2, 0.010, key="k1"),
        # Never answered 202 after three ambiguous attempts: accepted at most once.
        RequestOutcome([ev("b", "3")], "ProtocolError", False, 3, 0.020, "x", key="k2"),
        # Failed without an ambiguous attempt: certainly not accepted.
        RequestOutcome([ev("b", "4")], "422", False, 0, 0.020, "HTTP 422", key="k3"),
    ]
    assert [o.possible_extra_acceptances for o in outcomes] == [0, 1, 0]
    summary = summarize(4, outcomes, elapsed=1.0, topics=["a", "b"])
    assert (summary.sent, summary.ambiguous, summary.uncertain_unique) == (2, 1, 1)


def test_summary_of_nothing_is_all_zero():
    summary = summarize(0, [], elapsed=0.0, topics=["a"])
    assert (summary.sent, summary.unique, summary.errors, summary.events_per_second) == (0, 0, 0, 0)
    assert summary.latency_p99_ms == 0.0


def summary_with(sent, unique, ambiguous=0, uncertain_unique=0):
    outcomes = [RequestOutcome([ev("a", str(i)) for i in range(sent)], "202", True, 0, 0.01)]
    summary = summarize(sent, outcomes, 1.0, ["a", "b"])
    summary.unique = unique
    summary.duplicates = sent - unique
    summary.ambiguous = ambiguous
    summary.uncertain_unique = uncertain_unique
    return summary


@pytest.mark.parametrize(
    ("stored", "duplicates", "failed", "settled", "ok"),
    [
        (90, 10, 0, True, True),
        (90, 15, 0, True, True),
        (90, 20, 0, True, True),
        (90, 21, 0, True, False),
        (90, 9, 0, True, False),
        (89, 11, 0, True, False),
        (91, 10, 0, True, False),
        (90, 10, 1, True, False),
        (90, 10, 0, False, False),
    ],
)
def test_verification_needs_exact_stored_and_duplicates_within_the_ambiguous_window(
    stored, duplicates, failed, settled, ok
):
    summary = summary_with(sent=100, unique=90, ambiguous=10)
    result = compare(summary, TopicTotals(stored, duplicates, failed, 0), settled, 1.0)
    assert result.ok is ok
    assert result.expected_stored_min == result.expected_stored_max == 90
    assert (result.expected_duplicates_min, result.expected_duplicates_max) == (10, 20)


def test_verification_allows_keys_of_failed_ambiguous_requests_to_be_stored():
    summary = summary_with(sent=100, unique=90, ambiguous=10, uncertain_unique=5)
    assert compare(summary, TopicTotals(95, 15, 0, 0), True, 1.0).ok
    assert not compare(summary, TopicTotals(96, 14, 0, 0), True, 1.0).ok


def test_sum_topics_counts_only_the_runs_topics():
    stats = {
        "queued_events": 3,
        "topics": {
            "a": {"stored": 5, "duplicates": 1, "failed": 0},
            "other": {"stored": 100, "duplicates": 100, "failed": 100},
        },
    }
    totals = sum_topics(stats, ["a", "missing"])
    assert totals == TopicTotals(stored=5, duplicates=1, failed=0, queued=3)
    assert totals.processed == 6


def test_cli_defaults():
    config, args = parse_config([], environ={})
    assert config.url == "http://127.0.0.1:8080"
    assert (config.count, config.duplicate_ratio, config.batch_size) == (20000, 0.1, 500)
    assert (config.concurrency, config.topics, config.max_retries) == (8, 4, 8)
    assert config.token is None
    assert config.progress is True
    assert config.topic_prefix.startswith("run-")
    assert not args.verify and not args.json
    assert args.verify_timeout == 120.0


def test_cli_options_reach_the_config():
    argv = [
        "--url=http://api:9000",
        "--events=10",
        "--duplicates=0.5",
        "--batch-size=1",
        "--concurrency=2",
        "--topics=2",
        "--topic-prefix=mine",
        "--source=me",
        "--max-retries=0",
        "--timeout=2.5",
        "--token=secret",
        "--seed=42",
        "--no-progress",
        "--verify",
        "--verify-timeout=5",
        "--json",
    ]
    config, args = parse_config(argv, environ={"API_TOKEN": "from-env"})
    assert config == PublishConfig(
        url="http://api:9000",
        count=10,
        duplicate_ratio=0.5,
        batch_size=1,
        concurrency=2,
        topics=2,
        topic_prefix="mine",
        source="me",
        max_retries=0,
        timeout=2.5,
        token="secret",
        progress=False,
        seed=42,
    )
    assert config.topic_names() == ["mine-0", "mine-1"]
    assert args.verify and args.json and args.verify_timeout == 5.0


def test_cli_token_defaults_to_api_token_env():
    config, _ = parse_config([], environ={"API_TOKEN": "from-env"})
    assert config.token == "from-env"


@pytest.mark.parametrize(
    "argv",
    [
        ["--duplicates=1.0"],
        ["--duplicates=-0.1"],
        ["--batch-size=0"],
        ["--batch-size=1001"],
        ["--concurrency=0"],
        ["--events=-1"],
        ["--timeout=0"],
        ["--url=ftp://example"],
    ],
)
def test_cli_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(argv, environ={})
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


def test_text_summary_names_the_figures():
    summary = summarize(3, [RequestOutcome([ev("a", "1")] * 3, "202", True, 0, 0.5)], 1.0, ["a"])
    text = format_summary(summary)
    for label in ("sent", "unique", "duplicates", "errors", "ambiguous", "events/s", "p99"):
        assert label in text
    assert "3 events answered 202" in text


def test_main_with_no_events_prints_one_json_object(capsys):
    code = main(["--events=0", "--no-progress", "--json", "--url=http://127.0.0.1:9"])
    document = orjson.loads(capsys.readouterr().out)
    assert code == EXIT_OK
    assert document["summary"]["planned"] == 0
    assert document["verify"] is None
