"""Client library and `aggregator` command for the log aggregator's HTTP API.

`publisher.client.Client` publishes with batching, Idempotency-Keys and retries
that honour Retry-After, and reads events, follows them and reads counters;
`publisher.cli` builds the `aggregator` command on it.
"""
