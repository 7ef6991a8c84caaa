"""Unit tests of the publisher's pure logic: planning, batching, retries, summaries, CLI.

Including the sum of a run's batch outcomes and how the summary words it.
"""

import io
import threading
from collections import Counter
from datetime import UTC
from datetime import datetime

import orjson
import pytest
from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import MaxRetryError
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import RequestHistory

from aggregator_client.cli import EXIT_NOT_FOUND
from aggregator_client.cli import EXIT_OK
from aggregator_client.cli import EXIT_PUBLISH_FAILED
from aggregator_client.cli import EXIT_REFUSED
from aggregator_client.cli import EXIT_UNREACHABLE
from aggregator_client.cli import EXIT_USAGE
from aggregator_client.cli import main
from aggregator_client.cli import parse_args
from aggregator_client.client import encode_body
from aggregator_client.events import InputError
from aggregator_client.events import LineNumbers
from aggregator_client.events import batched
from aggregator_client.events import event_key
from aggregator_client.events import iter_batches
from aggregator_client.events import iter_lingering_batches
from aggregator_client.events import plan_events
from aggregator_client.events import read_ndjson
from aggregator_client.options import parse_moment
from aggregator_client.outcomes import RequestOutcome
from aggregator_client.outcomes import percentile
from aggregator_client.outcomes import sum_batches
from aggregator_client.outcomes import summarize
from aggregator_client.report import InputPlaces
from aggregator_client.report import format_batch
from aggregator_client.report import format_outcome
from aggregator_client.report import format_summary
from aggregator_client.report import refusals_of
from aggregator_client.retries import is_ambiguous
from aggregator_client.retries import make_retry
from aggregator_client.verify import TopicTotals
from aggregator_client.verify import compare
from aggregator_client.verify import sum_topics

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


def test_ndjson_bodies_are_one_event_per_line_without_blank_lines():
    events = plan_events(3, 0.0, TOPICS, "src", seed=9)
    body = encode_body(events, as_object=False, ndjson=True)
    lines = body.split(b"\n")
    # Line N of the body is event N - 1: the API's "line N" maps back without counting blanks.
    assert lines[-1] == b"" and [orjson.loads(line) for line in lines[:-1]] == events
    assert encode_body(events[:1], as_object=False, ndjson=True).count(b"\n") == 1


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
        (attempt(status=503), True),  # after a Redis timeout Redis may still run it
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
    args = parse_args(["publish", "--generate=5"], {}).args
    assert args.url == "http://127.0.0.1:8080"
    assert (args.generate, args.duplicates, args.batch_size) == (5, 0.1, 500)
    assert (args.concurrency, args.topics, args.max_retries) == (8, 4, 8)
    assert args.token is None and args.file is None and args.topic_prefix is None
    assert not args.verify and not args.json and not args.no_progress
    assert args.verify_timeout == 120.0


def test_cli_options_reach_the_arguments():
    argv = [
        "publish",
        "--url=http://api:9000",
        "--generate=10",
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
    args = parse_args(argv, {"API_TOKEN": "from-env"}).args
    assert (args.url, args.generate, args.duplicates, args.batch_size) == (
        "http://api:9000",
        10,
        0.5,
        1,
    )
    assert (args.concurrency, args.topics, args.topic_prefix, args.source) == (2, 2, "mine", "me")
    assert (args.max_retries, args.timeout, args.token, args.seed) == (0, 2.5, "secret", 42)
    assert args.no_progress and args.verify and args.json and args.verify_timeout == 5.0


def test_cli_url_and_token_default_to_the_environment():
    environ = {"API_TOKEN": "from-env", "AGGREGATOR_URL": "http://elsewhere:1"}
    for command in (["publish", "-"], ["tail"], ["stats"], ["dead-letters", "list"]):
        args = parse_args(command, environ).args
        assert (args.url, args.token) == ("http://elsewhere:1", "from-env")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["publish", "--duplicates=1.0"], "--duplicates: expected a number in [0, 1), got '1.0'"),
        (["publish", "--duplicates=-0.1"], "--duplicates: expected a number in [0, 1), got '-0.1'"),
        (["publish", "--batch-size=0"], "--batch-size: expected a whole number in [1, 1000]"),
        (["publish", "--batch-size=1001"], "--batch-size: expected a whole number in [1, 1000]"),
        (["publish", "--concurrency=0"], "--concurrency: expected a whole number >= 1, got '0'"),
        (["publish", "--generate=-1"], "--generate: expected a whole number >= 0, got '-1'"),
        (["publish", "--generate=ten"], "--generate: expected a whole number >= 0, got 'ten'"),
        (["publish", "--timeout=0"], "--timeout: expected a number of seconds > 0, got '0'"),
        (["--timeout=nan", "stats"], "--timeout: expected a number of seconds > 0, got 'nan'"),
        (["tail", "--payload=[1]"], "--payload: expected a JSON object, got list: '[1]'"),
        (["tail", "--payload=nope"], "--payload: expected a JSON object such as"),
        (["tail", "--since=yesterday"], "--since: expected a time like 10m, 2h, 3d (ago)"),
        (["dead-letters", "forget"], "ACTION: expected list or replay, got 'forget'"),
        (["dead-letters", "replay", "x"], "[ID]...: expected a whole number >= 1, got 'x'"),
        (["stats", "--nope"], "No such option '--nope'"),
        (["nope"], "No such command 'nope'"),
    ],
)
def test_cli_refuses_bad_options_in_its_own_words(argv, message, capsys):
    # (These were argparse's "invalid _non_negative value: 'ten'" and "invalid choice".)
    assert main(argv, {}) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"aggregator: {message}"), err
    assert "(see aggregator" in err and "--help)" in err


def test_cli_without_a_command_prints_the_help_and_exits_2(capsys):
    assert main([], {}) == EXIT_USAGE
    assert "Commands:" in capsys.readouterr().err


def test_global_options_go_before_or_after_the_command():
    before = parse_args(["--url=http://a:1", "--json", "--max-retries=0", "stats"], {}).args
    after = parse_args(["stats", "--url=http://a:1", "--json", "--max-retries=0"], {}).args
    assert (before.url, before.json, before.max_retries) == ("http://a:1", True, 0)
    assert vars(before) == vars(after)
    # Given twice, the command's own wins.
    both = parse_args(["--url=http://a:1", "tail", "--url=http://b:2"], {}).args
    assert both.url == "http://b:2"


def test_version_names_the_distribution(capsys):
    assert main(["--version"], {}) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("aggregator ") and "(log-aggregator-client)" in out


def test_relative_times_become_timestamps_for_the_api():
    args = parse_args(["tail", "--since=10m", "--until=2026-12-02T10:00:00Z"], {}).args
    since = datetime.fromisoformat(args.since)
    assert since.utcoffset() is not None
    assert abs((datetime.now(UTC) - since).total_seconds() - 600) < 60
    assert args.until == "2026-12-02T10:00:00+00:00"


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("10m", 600), ("2h", 7200), ("3d", 259200), ("1w", 604800)]
)
def test_relative_times_count_back_from_now(text, seconds):
    now = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    assert (now - parse_moment(text, now)).total_seconds() == seconds


def test_a_timestamp_without_offset_is_local_time():
    moment = parse_moment("2026-12-02T10:00:00")
    assert moment.utcoffset() == datetime(2026, 12, 2, 10).astimezone().utcoffset()
    with pytest.raises(ValueError, match="expected a time like 10m"):
        parse_moment("10 minutes")


@pytest.mark.parametrize(
    "argv",
    [
        ["publish", "--generate=1", "--url=ftp://example"],
        ["publish", "some.ndjson", "--generate=1"],
        ["publish", "some.ndjson", "--verify"],
        ["publish", "/nonexistent/events.ndjson"],
    ],
)
def test_cli_refuses_impossible_requests_with_exit_2(argv, capsys):
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("aggregator: ")


def test_help_lists_the_exit_codes(capsys):
    assert main(["--help"], {}) == EXIT_OK
    text = capsys.readouterr().out
    codes = (EXIT_OK, EXIT_USAGE, EXIT_PUBLISH_FAILED, EXIT_UNREACHABLE, EXIT_REFUSED)
    for code in (*codes, EXIT_NOT_FOUND):
        assert f"\n  {code} " in text


def test_text_summary_names_the_figures():
    summary = summarize(3, [RequestOutcome([ev("a", "1")] * 3, "202", True, 0, 0.5)], 1.0, ["a"])
    text = format_summary(summary)
    for label in ("accepted", "client-side", "errors", "ambiguous", "events/s", "p99"):
        assert label in text
    assert "3 events answered 202" in text
    assert "stopped" not in text
    # Counted here: labelled so, and never presented as what the server stored.
    assert "1 distinct keys, 2 repeated within this run (not the outcome)" in text
    assert "outcome" not in text.replace("(not the outcome)", "")


def test_summary_records_each_batch_with_this_runs_events():
    outcomes = [
        RequestOutcome([ev("a", "1"), ev("a", "2")], "202", True, 0, 0.1, batch_id="b1"),
        # Two small requests the API's group commit put in one batch.
        RequestOutcome([ev("a", "3")], "202", True, 0, 0.1, batch_id="b2"),
        RequestOutcome([ev("a", "4")], "202", True, 0, 0.1, batch_id="b2"),
        RequestOutcome([ev("a", "5")], "503", False, 1, 0.1, "HTTP 503: busy"),
    ]
    summary = summarize(5, outcomes, 1.0, ["a"])
    assert summary.batches == {"b1": 2, "b2": 2}
    assert "4 events answered 202, in 2 batches: b1 b2\n" in format_summary(summary)


def test_the_summary_names_the_first_batches_and_says_how_to_see_all():
    outcomes = [
        RequestOutcome([ev("a", str(n))], "202", True, 0, 0.1, batch_id=f"b{n}") for n in range(5)
    ]
    text = format_summary(summarize(5, outcomes, 1.0, ["a"]))
    assert "in 5 batches: b0 b1 ... (3 more: --json lists every one)" in text


def stored(batch_id, received, stored_, duplicates, failed=0):
    return {
        "batch_id": batch_id,
        "status": "stored",
        "received": received,
        "stored": stored_,
        "duplicates": duplicates,
        "failed": failed,
        "processed_at": "2026-12-02T10:00:00+00:00",
    }


def queued(batch_id, received):
    return {"batch_id": batch_id, "status": "queued", "received": received}


def test_a_republished_run_is_all_duplicates_from_the_servers_ledger():
    outcome = sum_batches(
        {"b1": 500, "b2": 500}, {"b1": stored("b1", 500, 0, 500), "b2": stored("b2", 500, 0, 500)}
    )
    assert (outcome.stored, outcome.duplicates, outcome.failed) == (0, 1000, 0)
    assert outcome.complete and not outcome.shared and outcome.queued_ids == []
    assert format_outcome(outcome) == [
        ("outcome", "stored 0, duplicates 1000, failed 0 (server's ledger: 2 of 2 batches stored)")
    ]


def test_batches_still_queued_unknown_or_unread_are_said_so():
    outcome = sum_batches(
        {"b1": 500, "b2": 300, "b3": 200, "b4": 7},
        {"b1": stored("b1", 500, 490, 5, 5), "b2": queued("b2", 300), "b3": None},
        waited=5.04,
        error="HTTP 503: database unavailable, retry in 1 s",
    )
    # b2 is queued, b3 unknown, and the lookup failed before it reached b4.
    assert (outcome.stored_batches, outcome.queued_batches) == (1, 1)
    assert (outcome.unknown_batches, outcome.unread_batches) == (1, 1)
    assert (outcome.received, outcome.stored, outcome.duplicates, outcome.failed) == (
        500,
        490,
        5,
        5,
    )
    assert outcome.queued_events == 300 and outcome.queued_ids == ["b2"]
    assert not outcome.complete
    assert format_outcome(outcome) == [
        (
            "outcome",
            "stored 490, duplicates 5, failed 5 so far (server's ledger: 1 of 4 batches stored)",
        ),
        ("queued", "still queued: 1 batch (300 events) after 5.0 s; aggregator batch b2"),
        ("unknown", "1 batch the server does not know (404)"),
        ("not read", "1 batch: HTTP 503: database unavailable, retry in 1 s"),
    ]


def test_an_outcome_nothing_could_be_read_of_says_why():
    outcome = sum_batches({"b1": 5}, {}, error="HTTP 403: this token lacks the 'read' scope")
    assert format_outcome(outcome) == [
        ("outcome", "not read: HTTP 403: this token lacks the 'read' scope")
    ]


def test_queued_batches_are_named_and_a_shared_batch_is_flagged():
    outcome = sum_batches(
        {"b1": 3, "b2": 4, "b3": 5},
        {"b1": stored("b1", 10, 10, 0), "b2": queued("b2", 4), "b3": queued("b3", 5)},
        waited=0.5,
    )
    # b1 carried 7 events of other requests that arrived with ours.
    assert outcome.shared and outcome.received == 10
    rows = dict(format_outcome(outcome))
    assert rows["queued"] == (
        "still queued: 2 batches (9 events) after 0.5 s; aggregator batch ID (--json lists them)"
    )
    assert "shared" in rows


def test_a_batch_prints_as_one_line():
    assert format_batch(queued("b1", 12)) == "b1  queued  received 12"
    assert format_batch(stored("b2", 1000, 0, 1000)) == (
        "b2  stored  received 1000: stored 0, duplicates 1000, failed 0"
        " (at 2026-12-02T10:00:00+00:00)"
    )


def test_batch_command_and_wait_options():
    assert parse_args(["publish", "-"], {}).args.wait_stored == 5.0
    assert parse_args(["publish", "-", "--wait-stored", "0"], {}).args.wait_stored == 0.0
    args = parse_args(["batch", "b1", "b2", "--wait", "2.5"], {}).args
    assert (args.ids, args.wait) == (("b1", "b2"), 2.5)


@pytest.mark.parametrize(
    "argv",
    [
        ["batch"],
        ["batch", "b1", "--wait=-1"],
        ["publish", "-", "--wait-stored=x"],
        ["publish", "-", "--wait-stored=99999"],
    ],
)
def test_batch_options_are_checked(argv, capsys):
    assert main(argv, {}) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("aggregator: ")


def test_summary_counts_events_never_sent():
    refused = RequestOutcome([ev("a", "1")] * 2, "401", False, 0, 0.1, "HTTP 401: no")
    summary = summarize(10, [refused], 1.0, ["a"])
    assert (summary.sent, summary.failed_events, summary.unsent) == (0, 2, 8)
    assert refused.refused


def test_ndjson_skips_blank_lines_and_names_a_broken_one():
    good = [{"topic": "a", "n": 1}, {"topic": "b", "n": 2}]
    lines = b'{"topic": "a", "n": 1}\n\n   \n{"topic": "b", "n": 2}\n'
    assert list(read_ndjson(io.BytesIO(lines))) == good
    with pytest.raises(InputError, match="line 3: not JSON"):
        list(read_ndjson(io.BytesIO(b'{"a": 1}\n\n{"a": \n')))
    with pytest.raises(InputError, match="line 1: expected a JSON object, got list"):
        list(read_ndjson(io.BytesIO(b"[1, 2]\n")))


def test_iter_batches_reads_only_as_far_as_it_yields():
    consumed = []

    def events():
        for n in range(10):
            consumed.append(n)
            yield {"n": n}

    batches = iter_batches(events(), 4)
    assert [event["n"] for event in next(batches)] == [0, 1, 2, 3]
    assert consumed == [0, 1, 2, 3]
    assert [len(batch) for batch in batches] == [4, 2]


def test_lingering_batches_are_full_when_events_come_fast():
    events = ({"n": n} for n in range(25))
    assert [len(batch) for batch in iter_lingering_batches(events, 10, linger=30)] == [10, 10, 5]


def test_lingering_batches_send_what_came_once_the_first_event_waited():
    release = threading.Event()

    def trickle():
        yield from ({"n": n} for n in range(3))
        release.wait(30)  # The rest comes only after the first batch went out.
        yield from ({"n": n} for n in range(3, 5))

    batches = iter_lingering_batches(trickle(), 100, linger=0.05)
    assert [event["n"] for event in next(batches)] == [0, 1, 2]
    release.set()
    assert [[event["n"] for event in batch] for batch in batches] == [[3, 4]]


def test_lingering_batches_raise_an_input_error_after_the_events_before_it():
    def broken():
        yield {"n": 0}
        raise InputError(2, "not JSON")

    batches = iter_lingering_batches(broken(), 100, linger=0.05)
    assert next(batches) == [{"n": 0}]
    with pytest.raises(InputError, match="line 2"):
        next(batches)


def test_line_numbers_count_the_blank_lines_before_each_event():
    lines = LineNumbers()
    stream = io.BytesIO(b'\n{"n": 0}\n\n\n{"n": 1}\n{"n": 2}\n  \n{"n": 3}\n')
    events = list(read_ndjson(stream, lines))
    assert [event["n"] for event in events] == [0, 1, 2, 3]
    assert [lines.line(position) for position in range(4)] == [2, 5, 6, 8]


def test_a_file_without_blank_lines_costs_no_memory():
    lines = LineNumbers()
    list(read_ndjson(io.BytesIO(b'{"n": 1}\n' * 1000), lines))
    assert lines.line(749) == 750 and lines._gaps == []


def refused(events, errors, offset):
    return RequestOutcome(
        events, "422", False, 0, 0.1, "HTTP 422: invalid", errors=errors, offset=offset
    )


def test_a_refused_event_is_named_by_its_file_line_not_its_place_in_the_batch():
    lines = LineNumbers()
    # 10 blank lines among the first events: event 749 (position 249 of the second
    # batch of 500) is on line 760.
    text = b"\n" * 10 + b'{"n": 1}\n' * 1000
    list(read_ndjson(io.BytesIO(text), lines))
    places = InputPlaces("events.ndjson", lines)
    errors = {
        "249": {"timestamp": ["Not a valid datetime."]},
        "3": {"payload": {"a.b": ["too big"]}},
    }
    found = refusals_of(refused([{}] * 500, errors, 500), places)
    assert [(r.where, r.line, r.problems) for r in found] == [
        ("events.ndjson line 514", 514, "payload.a.b: too big"),
        ("events.ndjson line 760", 760, "timestamp: Not a valid datetime."),
    ]
    rows = format_summary(summarize(1000, [], 1.0, []), None, found, 2)
    assert "refused     events.ndjson line 514: payload.a.b: too big" in rows
    assert '"249"' not in rows


def test_refusals_of_a_single_object_or_a_whole_batch_name_their_lines():
    lines = LineNumbers()
    list(read_ndjson(io.BytesIO(b'{"n": 1}\n' * 20), lines))
    places = InputPlaces("stdin", lines)
    # Sent as a bare object (--batch-size 1): the problems are per field.
    [one] = refusals_of(refused([{}], {"topic": ["Missing data for required field."]}, 7), places)
    assert (one.where, one.problems) == ("stdin line 8", "topic: Missing data for required field.")
    # A problem of the whole batch names its range; generated events, their order.
    [whole] = refusals_of(refused([{}] * 10, {"_schema": ["too many"]}, 10), places)
    assert (whole.where, whole.problems) == ("stdin line 11 to 20", "too many")
    [gen] = refusals_of(refused([{}] * 2, {"1": {"source": ["bad"]}}, 4), InputPlaces())
    assert gen.where == "event 6"
    # Anything but a 422 is not a refusal of events.
    assert refusals_of(RequestOutcome([{}], "503", False, 1, 0.1, "busy"), places) == []


def test_refusals_of_an_ndjson_body_are_named_by_the_inputs_line():
    lines = LineNumbers()
    # 10 blank lines first: the event on line 121 of the second body of 500 (event 620)
    # is on line 631 of the file.
    list(read_ndjson(io.BytesIO(b"\n" * 10 + b'{"n": 1}\n' * 1000), lines))
    places = InputPlaces("events.ndjson", lines)
    errors = {"line 121": {"timestamp": ["bad"]}, "line 0": {"x": ["?"]}, "line x": ["?"]}
    found = refusals_of(refused([{}] * 500, errors, 500), places)
    assert [(r.where, r.line, r.problems) for r in found] == [
        ("events.ndjson line 631", 631, "timestamp: bad"),
        # Keys that name no line of the body are the batch's, named by its range.
        ("events.ndjson line 511 to 1010", 511, "line 0.x: ?; line x: ?"),
    ]


def test_more_refusals_than_shown_are_counted():
    lines = LineNumbers()
    list(read_ndjson(io.BytesIO(b'{"n": 1}\n' * 20), lines))
    errors = {str(n): {"topic": ["bad"]} for n in range(8)}
    found = refusals_of(refused([{}] * 8, errors, 0), InputPlaces("f", lines))
    text = format_summary(summarize(8, [], 1.0, []), None, found, 8)
    assert "f line 5: topic: bad" in text and "f line 6" not in text
    assert "... and 3 more (--json lists up to 100)" in text
