"""Client library and `aggregator` command for the log aggregator's HTTP API.

`aggregator_client.client.Client` publishes with batching, Idempotency-Keys and retries
that honour Retry-After, and reads events, follows them and reads counters;
`aggregator_client.cli` builds the `aggregator` command on it.
"""
